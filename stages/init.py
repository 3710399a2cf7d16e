"""Stage init: the seeded, class-less model (CCNF or empty baseline bank) task 0 starts from."""

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
    init_model(params, Path(args.features), Path(INIT_CHECKPOINT))
    console.print(f"initial {params.model.kind} model written to {INIT_CHECKPOINT}")


if __name__ == "__main__":
    main()
