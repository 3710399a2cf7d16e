"""Stage aggregate: R matrices, final averages, forgetting, summary metrics and plots."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.aggregate import aggregate
from ccnf.config import load_params
from ccnf.console import console, report_user_errors


@report_user_errors
def main() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    summary = aggregate(params, Path("metrics"), Path("models"), Path("eval"), Path("plots"))
    for score, vals in summary.items():
        console.print(
            f"{score:>6}: image AUROC {vals['image_auroc']:.4f}  pixel AUROC "
            f"{vals['pixel_auroc']:.4f}  AUPRO {vals['aupro']:.4f}  image forgetting "
            f"{vals['image_forgetting']:+.4f}"
        )


if __name__ == "__main__":
    main()
