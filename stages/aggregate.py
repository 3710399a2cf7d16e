"""Stage aggregate: R matrices, final averages, forgetting, summary metrics and plots."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.aggregate import aggregate
from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.names import SCORES


@report_user_errors
def main() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    summary = aggregate(params, Path("metrics"), Path("models"), Path("eval"), Path("plots"))
    for block, title in ((summary, "task-aware"), (summary["agnostic"], "task-agnostic")):
        console.print(title)
        for score in [s for s in SCORES if s in block]:
            vals = block[score]
            forget = vals.get("image_forgetting")
            console.print(
                f"{score:>6}: image AUROC {vals['image_auroc']:.4f}  pixel AUROC "
                f"{vals['pixel_auroc']:.4f}  AUPRO {vals['aupro']:.4f}  image forgetting "
                f"{'—' if forget is None else f'{forget:+.4f}'}  F1 max/kstd/pct "
                f"{vals['image_f1max']:.3f}/{vals['image_f1_kstd']:.3f}/"
                f"{vals['image_f1_pct']:.3f}"
            )
    sel = summary["class_select"]
    console.print(f"class selection ({sel['method']}): accuracy {sel['accuracy']:.4f}")

if __name__ == "__main__":
    main()
