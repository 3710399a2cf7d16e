"""Stage evaluate@<task>: score every seen task's test set with every score definition."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.evaluate import evaluate_task
from ccnf.names import SCORES


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
    agn = result["agnostic"]
    ran = not agn["same_as_aware"] and not agn.get("skipped")
    for tname, scores in result["per_task"].items():
        line = ", ".join(
            f"{s} {scores[s]['image_auroc']:.3f}/{scores[s]['pixel_auroc']:.3f}"
            for s in SCORES
            if s in scores
        )
        console.print(f"after {args.task}, task {tname} (image/pixel AUROC), aware: {line}")
        if ran:
            a = agn["per_task"][tname]
            line = ", ".join(
                f"{s} {a[s]['image_auroc']:.3f}/{a[s]['pixel_auroc']:.3f}"
                for s in SCORES
                if s in a
            )
            console.print(
                f"    agnostic ({agn['class_select']}, selection accuracy "
                f"{a['selection_accuracy']:.3f}): {line}"
            )
    if ran:
        acc = ", ".join(f"{m} {v:.3f}" for m, v in agn["selection_accuracy_by_method"].items())
        console.print(f"class-selection accuracy over seen classes: {acc}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result["timing_s"].items())
    console.print(f"flow time: {timing}")


if __name__ == "__main__":
    main()
