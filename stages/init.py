"""Stage init: the seeded, class-less CCNF that task 0 starts from (models/init)."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import INIT_CHECKPOINT, load_params
from ccnf.console import console, report_user_errors
from ccnf.train import init_model


@report_user_errors
def main() -> None:
    args = parser(__doc__, features=True).parse_args()
    params = load_params(args.params)
    model = init_model(params, Path(args.features), Path(INIT_CHECKPOINT))
    n = sum(p.numel() for p in model.parameters())
    console.print(f"initial model written to {INIT_CHECKPOINT} ({n} parameters)")


if __name__ == "__main__":
    main()
