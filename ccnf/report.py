"""Result tables rendered from the study's metrics, and the README check CI runs.

The README holds the default study's tables between ``<!-- results:begin -->`` and
``<!-- results:end -->``. ``ccnf report readme`` rewrites that block from metrics/;
``ccnf report check`` re-renders it from fresh metrics and compares every number with the
committed one within a tolerance.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ccnf.atomic import write_text
from ccnf.errors import CcnfError
from ccnf.names import SCORES, STALE_FLAGGED
from ccnf.store import read_json

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

# one figure each, so that no continual-learning number can be read for another: the final
# average is what this study reports; the step average is what IUF / CDAD tables print
CONTINUAL_COLUMNS = (
    ("image_auroc", "image AUROC after the last task"),
    ("image_auroc_over_classes", "image AUROC after the last task, mean over classes"),
    ("image_step_average", "A-image AUROC (mean over steps)"),
    ("image_diagonal", "image AUROC right after each task"),
    ("image_bwt", "image backward transfer"),
    ("image_forgetting", "image forgetting"),
    ("pixel_auroc", "pixel AUROC after the last task"),
    ("pixel_auroc_over_classes", "pixel AUROC after the last task, mean over classes"),
    ("pixel_step_average", "A-pixel AUROC (mean over steps)"),
    ("pixel_bwt", "pixel backward transfer"),
)


THRESHOLD_COLUMNS = (
    ("image_ap", "image AP"),
    ("image_ap_chance", "AP of a random ranking"),
    ("image_f1max", "F1-max (best threshold)"),
    ("image_f1_kstd", "F1 @ mean+k*std"),
    ("image_precision_kstd", "precision @ mean+k*std"),
    ("image_recall_kstd", "recall @ mean+k*std"),
    ("image_f1_pct", "F1 @ percentile"),
    ("image_f1_all", "F1 of flagging every image"),
    ("image_normal_flagged_kstd", "normal images flagged @ mean+k*std"),
)


def load_metrics(metrics_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = [metrics_dir / "summary.json", metrics_dir / "per_class.json"]
    for p in paths:
        if not p.is_file():
            raise CcnfError(f"metrics not found: {p}", fix="run the study first: dvc repro")
    summary, per_class = (read_json(p, what="metrics file") for p in paths)
    if "agnostic" not in summary or "class_select" not in summary:
        raise CcnfError(
            f"{paths[0]} predates the task-agnostic evaluation (no 'agnostic' block)",
            fix="re-run the study: dvc repro",
        )
    return summary, per_class


def _table(block: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> str:
    """Markdown table, one row per score of ``block`` ({score: {key: value}})."""
    head = "| score | " + " | ".join(label for _, label in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    rows = [
        f"| {s} | " + " | ".join(_cell(block[s].get(k)) for k, _ in columns) + " |"
        for s in SCORES
        if s in block
    ]
    return "\n".join([head, sep, *rows])


def _cell(value: float | None) -> str:
    """A number to 4 decimals; '—' where the metric was not measured (e.g. the agnostic
    forgetting when only the last task ran the task-agnostic block)."""
    return "—" if value is None else f"{value:.4f}"


def summary_table(summary: dict[str, Any]) -> str:
    """Task-aware final averages and forgetting (the top-level score blocks of summary.json)."""
    return _table(summary, SUMMARY_COLUMNS)


def continual_table(summary: dict[str, Any]) -> str:
    """The continual-learning figures side by side, each under its own name (task-aware)."""
    return _table(summary, CONTINUAL_COLUMNS)


def agnostic_table(summary: dict[str, Any]) -> str:
    """Task-agnostic final averages and forgetting (summary["agnostic"])."""
    return _table(summary["agnostic"], SUMMARY_COLUMNS)


def selection_table(summary: dict[str, Any]) -> str:
    """Class-selection accuracy: the method used, and every method a selection pass measured."""
    sel = summary["class_select"]
    head = "| class selection | accuracy (final average) | forgetting |"
    sep = "|---|---:|---:|"
    rows = [
        f"| {sel['method']} (used) | {sel['accuracy']:.4f} | {_cell(sel.get('forgetting'))} |"
    ]
    for key, value in sel.items():
        method = key.removesuffix("_accuracy")
        if key.endswith("_accuracy") and method != sel["method"]:
            rows.append(f"| {method} | {value:.4f} | — |")
    return "\n".join([head, sep, *rows])


def threshold_table(summary: dict[str, Any], agnostic: bool = False) -> str:
    """Image-level F1-max next to precision/recall/F1 at the two automatic thresholds."""
    return _table(summary["agnostic"] if agnostic else summary, THRESHOLD_COLUMNS)


def per_class_table(per_class: dict[str, Any], headline: str = "nf") -> str:
    """One row per class of the final model: the headline score's image/pixel AUROC and
    AUPRO, every score's image AUROC, the agnostic headline image AUROC, the selection
    accuracy, and the scores whose calibration has gone stale (more than half of the class's
    normal test images at or above their mean + k*std threshold)."""
    others = [s for s in SCORES if s in next(iter(per_class.values()))]
    head = (
        f"| task | class | {headline} image | {headline} pixel | {headline} AUPRO | "
        + " | ".join(f"{s} image" for s in others if s != headline)
        + f" | agnostic {headline} image | selection accuracy | stale calibration |"
    )
    sep = "|---:|---|" + "---:|" * (4 + len(others)) + "---|"
    rows = []
    for cls, m in per_class.items():
        a, h = m["agnostic"], m[headline]
        cells = [f"t{m['task']}", cls, f"{h['image_auroc']:.4f}", f"{h['pixel_auroc']:.4f}",
                 f"{h['aupro']:.4f}"]
        cells += [f"{m[s]['image_auroc']:.4f}" for s in others if s != headline]
        cells += [f"{a[headline]['image_auroc']:.4f}", f"{a['selection_accuracy']:.4f}",
                  ", ".join(stale_scores(m)) or "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def stale_scores(entry: dict[str, Any]) -> list[str]:
    """Scores of one class whose normal test images are mostly (> STALE_FLAGGED) at or above
    the class's mean + k*std calibration threshold: the calibration no longer fits the
    model (drift after later tasks), so its threshold metrics sit at the trivial floor."""
    return [
        s for s in SCORES
        if s in entry and entry[s].get("image_normal_flagged_kstd", 0.0) > STALE_FLAGGED
    ]


def results_block(
    summary: dict[str, Any], per_class: dict[str, Any], headline: str = "nf"
) -> str:
    """The README's results block; ``headline``: ``score.headline`` of the params."""
    method = summary["class_select"]["method"]
    return (
        "Final averages over the tasks after the last task, **task-aware** (each test image "
        "scored under its true class), and forgetting. Scores: `nf` = -log p(x|y)/D, `latent` "
        "= 0.5 ||z - mu||^2 / D (the same flow without its log-det), `proto` = distance of "
        "the latent mean to the class prototype, `hybrid` = their calibrated mix; the study "
        f"leads with `{headline}` (`score.headline`):\n\n"
        + summary_table(summary)
        + "\n\n**Continual-learning figures, each under its own name** (task-aware): the "
        "average after the last task (this study's figure, above: each task weighs the same); "
        "the same after the last task as a mean over classes (what per-class paper tables end "
        "in; it differs only when tasks differ in size, e.g. 10-5 or 14-1); the A-AUROC, the "
        "mean over steps of the average over the tasks seen so far (what the IUF and CDAD "
        "tables print: it counts the early, easy steps, so it runs higher); each task right "
        "after it was learned (the diagonal of R); backward transfer, the mean of R[T-1][j] - "
        "R[j][j] over earlier tasks (negative = forgotten); forgetting, the mean drop from "
        "each earlier task's best value:\n\n"
        + continual_table(summary)
        + "\n\n**Task-agnostic**: each test image scored under the class selected by "
        f"`{method}` (`score.class_select`) among all classes seen so far; hybrid scores and "
        "thresholds use the selected class's calibration (after the last task only, unless "
        "`eval.agnostic_every_task`). Class-selection accuracy (fraction of test images "
        "assigned their true class, mean over tasks):\n\n"
        + selection_table(summary)
        + "\n\n"
        + agnostic_table(summary)
        + "\n\nAutomatic image thresholds from each class's training-normal calibration "
        "scores (U-Flow): mean + k*std (`eval.threshold_k`) and a percentile "
        "(`eval.threshold_percentile`); image-level final averages next to F1-max (the best "
        "threshold, chosen on test data) and the chance levels: the AP of a random ranking "
        "(= the defect rate) and the F1 of flagging every image as defective (2r / (1 + r) "
        "for defect rate r), which a stale calibration falls to. Task-aware:\n\n"
        + threshold_table(summary)
        + "\n\nand task-agnostic:\n\n"
        + threshold_table(summary, agnostic=True)
        + "\n\nPer class, final model (agnostic columns: class selected by "
        f"`{method}`; stale calibration: scores whose mean + k*std threshold flags more than "
        "half of the class's normal test images):\n\n"
        + per_class_table(per_class, headline)
    )


def _split(text: str, path: Path) -> tuple[str, str, str]:
    if BEGIN not in text or END not in text:
        raise CcnfError(
            f"{path} has no results block", fix=f"add the markers {BEGIN} and {END} to it"
        )
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def update_readme(readme: Path, metrics_dir: Path, headline: str = "nf") -> None:
    head, _, tail = _split(readme.read_text(), readme)
    block = results_block(*load_metrics(metrics_dir), headline)
    write_text(readme, f"{head}{BEGIN}\n{block}\n{END}{tail}")


def check_readme(
    readme: Path, metrics_dir: Path, tolerance: float, headline: str = "nf"
) -> list[str]:
    """Differences between README's block and one rendered from metrics_dir (empty: match)."""
    _, committed, _ = _split(readme.read_text(), readme)
    fresh = results_block(*load_metrics(metrics_dir), headline)
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
