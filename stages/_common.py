"""Argument parsing shared by the stage scripts (they only parse, call ccnf, write)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# stage scripts run as `python stages/x.py` from the repo root: make `ccnf` importable even
# without an editable install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parser(
    description: str, *, task: bool = False, features: bool = False
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if task:
        p.add_argument("--task", required=True, help="task name from params.yaml: tasks")
    if features:
        p.add_argument("--features", default="features", help="feature cache directory")
    return p
