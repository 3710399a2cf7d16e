"""Stage evaluate@<task>: score every seen task's test set with every score definition."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.evaluate import evaluate_task


@report_user_errors
def main() -> None:
    args = parser(__doc__, task=True, features=True).parse_args()
    params = load_params(args.params)
    result = evaluate_task(
        params,
        args.task,
        Path(args.features),
        Path("models") / args.task,
        Path("metrics/tasks") / f"{args.task}.json",
        Path("eval") / args.task,
        console=console,
    )
    for tname, scores in result["per_task"].items():
        line = ", ".join(
            f"{s} {v['image_auroc']:.3f}/{v['pixel_auroc']:.3f}" for s, v in scores.items()
        )
        console.print(f"after {args.task}, task {tname} (image/pixel AUROC): {line}")


if __name__ == "__main__":
    main()
