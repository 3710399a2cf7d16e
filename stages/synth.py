"""Stage synth: generate the embedded synthetic dataset (MVTec layout) into data/synthetic."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import SYNTHETIC_ROOT, load_params
from ccnf.console import console, report_user_errors
from ccnf.data.synthetic import generate


@report_user_errors
def main() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    summary = generate(Path(SYNTHETIC_ROOT), params.data.synthetic)
    console.print(f"synthetic dataset written to {SYNTHETIC_ROOT}: {summary}")


if __name__ == "__main__":
    main()
