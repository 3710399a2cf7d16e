"""``ccnf bench`` as a script (not part of the default study; see benchmarks/README.md).

    python benchmarks/bench.py                 # everything, ~10 min on 2 CPU cores
    python benchmarks/bench.py --no-e2e        # without dvc repro / dvc exp run (~2 min)
    python benchmarks/bench.py --repeats 5 --out /tmp/bench.json

Run from the repository root; writes metrics/bench.json and prints the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ccnf.cli import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="benchmarks/bench.py")
