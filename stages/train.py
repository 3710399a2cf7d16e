"""Stage train@<task>: resume from the previous task's checkpoint, train on this task."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.train import train_task


@report_user_errors
def main() -> None:
    args = parser(__doc__, task=True, features=True).parse_args()
    params = load_params(args.params)
    prev = Path(params.tasks[args.task].prev) if args.task in params.tasks else Path()
    stats = train_task(
        params, args.task, Path(args.features), prev, Path("models") / args.task, console=console
    )
    if stats["steps"] == 0:  # e.g. joint: every class was learned at task 0
        console.print(f"task {args.task}: no training steps (train.strategy "
                      f"{params.train.strategy}); checkpoint passed on")
        return
    console.print(
        f"task {args.task}: {stats['steps']:.0f} steps in {stats['seconds']:.1f} s, "
        f"final loss {stats['final_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
