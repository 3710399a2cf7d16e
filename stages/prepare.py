"""Stage prepare: index data.root (as data.source lays it out) into data/manifest.json."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.data.sources import index_source


@report_user_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", default="data/manifest.json")
    args = p.parse_args()
    params = load_params(args.params)
    manifest = index_source(params.data.source, Path(params.data.root), params.classes)
    manifest.save(Path(args.out))
    console.print(
        f"indexed {len(manifest.records)} images of {len(params.classes)} classes "
        f"({params.data.source} data under {params.data.root})"
    )


if __name__ == "__main__":
    main()
