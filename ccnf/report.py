"""Result tables rendered from the study's metrics, and the README check CI runs.

The README holds the default study's tables between ``<!-- results:begin -->`` and
``<!-- results:end -->``. ``ccnf report readme`` rewrites that block from metrics/;
``ccnf report check`` re-renders it from fresh metrics and compares every number with the
committed one within a tolerance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ccnf.atomic import write_text
from ccnf.errors import CcnfError
from ccnf.scoring import SCORES

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_ap", "image AP"),
    ("image_f1max", "image F1-max"),
    ("image_forgetting", "image forgetting"),
    ("pixel_forgetting", "pixel forgetting"),
)
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def load_metrics(metrics_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = [metrics_dir / "summary.json", metrics_dir / "per_class.json"]
    for p in paths:
        if not p.is_file():
            raise CcnfError(f"metrics not found: {p}", fix="run the study first: dvc repro")
    summary, per_class = (json.loads(p.read_text()) for p in paths)
    return summary, per_class


def summary_table(summary: dict[str, Any]) -> str:
    head = "| score | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(SUMMARY_COLUMNS)
    rows = [
        f"| {s} | " + " | ".join(f"{summary[s][k]:.4f}" for k, _ in SUMMARY_COLUMNS) + " |"
        for s in SCORES
        if s in summary
    ]
    return "\n".join([head, sep, *rows])


def per_class_table(per_class: dict[str, Any]) -> str:
    head = (
        "| task | class | nf image | nf pixel | nf AUPRO | proto image | hybrid image | "
        "hybrid pixel |"
    )
    sep = "|---:|---|---:|---:|---:|---:|---:|---:|"
    rows = []
    for cls, m in per_class.items():
        rows.append(
            f"| t{m['task']} | {cls} | {m['nf']['image_auroc']:.4f} | "
            f"{m['nf']['pixel_auroc']:.4f} | {m['nf']['aupro']:.4f} | "
            f"{m['proto']['image_auroc']:.4f} | {m['hybrid']['image_auroc']:.4f} | "
            f"{m['hybrid']['pixel_auroc']:.4f} |"
        )
    return "\n".join([head, sep, *rows])


def results_block(summary: dict[str, Any], per_class: dict[str, Any]) -> str:
    return (
        "Final averages over the 5 tasks after the last task (oracle class selection), "
        "and forgetting:\n\n"
        + summary_table(summary)
        + "\n\nPer class, final model:\n\n"
        + per_class_table(per_class)
    )


def _split(text: str, path: Path) -> tuple[str, str, str]:
    if BEGIN not in text or END not in text:
        raise CcnfError(
            f"{path} has no results block", fix=f"add the markers {BEGIN} and {END} to it"
        )
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def update_readme(readme: Path, metrics_dir: Path) -> None:
    head, _, tail = _split(readme.read_text(), readme)
    block = results_block(*load_metrics(metrics_dir))
    write_text(readme, f"{head}{BEGIN}\n{block}\n{END}{tail}")


def check_readme(readme: Path, metrics_dir: Path, tolerance: float) -> list[str]:
    """Differences between README's block and one rendered from metrics_dir (empty: match)."""
    _, committed, _ = _split(readme.read_text(), readme)
    fresh = results_block(*load_metrics(metrics_dir))
    problems = []
    c_lines = [ln for ln in committed.strip().splitlines() if ln.startswith("|")]
    f_lines = [ln for ln in fresh.strip().splitlines() if ln.startswith("|")]
    if len(c_lines) != len(f_lines):
        return [f"README table has {len(c_lines)} rows, fresh metrics give {len(f_lines)}"]
    for c, f in zip(c_lines, f_lines, strict=True):
        c_cells = [x.strip() for x in c.strip("|").split("|")]
        f_cells = [x.strip() for x in f.strip("|").split("|")]
        label = " ".join(f_cells[:2])
        for cc, fc in zip(c_cells, f_cells, strict=False):
            if NUMBER.fullmatch(fc) and NUMBER.fullmatch(cc):
                if abs(float(cc) - float(fc)) > tolerance:
                    problems.append(f"{label}: README {cc} vs fresh {fc}")
            elif cc != fc:
                problems.append(f"{label}: README '{cc}' vs fresh '{fc}'")
    return problems
