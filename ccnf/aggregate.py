"""Aggregate per-task evaluations into the study's metrics and plots.

R[t][j] (metric of task j after training task t) per score and metric; final average =
mean_j R[T-1][j]; forgetting = mean_{j<T-1} max_{t in [j, T-2]} R[t][j] - R[T-1][j].

Writes (all small, git-tracked):
    metrics/summary.json    {score: {image_auroc, pixel_auroc, aupro, image_ap, image_f1max,
                             image_forgetting, pixel_forgetting, aupro_forgetting}}
    metrics/matrices.json   {score: {metric: R as nested lists (null above the diagonal)}}
    metrics/per_class.json  final model, {class: {"task": j, score: {metric: value}}}
    plots/*.png, plots/loss.tsv
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from ccnf.atomic import write_json, write_text
from ccnf.config import Params
from ccnf.data.images import load_image
from ccnf.errors import CcnfError
from ccnf.evaluate import METRICS
from ccnf.metrics import final_average, forgetting, roc_curve
from ccnf.plots import (
    GalleryRow,
    plot_gallery,
    plot_loss_curves,
    plot_matrices,
    plot_roc_curves,
    plot_task_curves,
)
from ccnf.scoring import SCORES

FORGETTING_OF = {"image_auroc": "image", "pixel_auroc": "pixel", "aupro": "aupro"}


def load_task_results(params: Params, metrics_dir: Path) -> list[dict[str, Any]]:
    results = []
    for task in params.task_names:
        path = metrics_dir / "tasks" / f"{task}.json"
        if not path.is_file():
            raise CcnfError(f"evaluation of task {task} missing: {path}", fix="dvc repro")
        results.append(json.loads(path.read_text()))
    return results


def matrices(results: list[dict[str, Any]], task_names: list[str]) -> dict[str, dict]:
    """{score: {metric: R (T, T) with NaN above the diagonal}}."""
    n = len(task_names)
    out: dict[str, dict[str, np.ndarray]] = {}
    for score in SCORES:
        out[score] = {}
        for metric in METRICS:
            r = np.full((n, n), np.nan)
            for t, res in enumerate(results):
                for j, tname in enumerate(task_names[: t + 1]):
                    r[t, j] = res["per_task"][tname][score][metric]
            out[score][metric] = r
    return out


def summarize(mats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for score, by_metric in mats.items():
        entry = {m: round(final_average(r), 6) for m, r in by_metric.items()}
        for metric, short in FORGETTING_OF.items():
            entry[f"{short}_forgetting"] = round(forgetting(by_metric[metric]), 6)
        summary[score] = entry
    return summary


def _loss_rows(models_dir: Path, task_names: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for task in task_names:
        path = models_dir / task / "train_log.tsv"
        if not path.is_file():
            raise CcnfError(f"training log missing: {path}", fix="dvc repro")
        with path.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                rows.append({k: float(v) for k, v in row.items() if v != ""})
    return rows


def _write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_fmt(row.get(c)) for c in columns))
    write_text(path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def aggregate(
    params: Params,
    metrics_dir: Path,
    models_dir: Path,
    eval_dir: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    task_names = params.task_names
    results = load_task_results(params, metrics_dir)
    mats = matrices(results, task_names)
    summary = summarize(mats)
    write_json(metrics_dir / "summary.json", summary)
    write_json(
        metrics_dir / "matrices.json",
        {
            s: {m: [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in r]
                for m, r in by_m.items()}
            for s, by_m in mats.items()
        },
    )
    write_json(metrics_dir / "per_class.json", results[-1]["per_class"])

    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_task_curves(
        {f"{s} {m.replace('_', ' ')}": mats[s][m] for s in SCORES for m in ("image_auroc",
                                                                           "pixel_auroc")},
        task_names,
        plots_dir / "task_curves.png",
        "AUROC of each task after each training task",
    )
    for metric in ("image_auroc", "pixel_auroc"):
        plot_matrices(
            {s: mats[s][metric] for s in SCORES},
            task_names,
            plots_dir / f"R_{metric}.png",
            f"R[t][j]: {metric.replace('_', ' ')} of task j after task t",
        )
    rows = _loss_rows(models_dir, task_names)
    _write_tsv(plots_dir / "loss.tsv", rows)
    plot_loss_curves(rows, plots_dir / "loss_curves.png", "training loss terms (all tasks)")

    last = task_names[-1]
    raw = np.load(eval_dir / last / "image_scores.npz")
    for score in SCORES:
        curves = {}
        for cls in params.classes:
            labels, values = raw[f"{cls}/labels"], raw[f"{cls}/{score}"]
            fpr, tpr, _ = roc_curve(labels, values)
            curves[cls] = (fpr, tpr, results[-1]["per_class"][cls][score]["image_auroc"])
        plot_roc_curves(
            curves, plots_dir / f"roc_{score}.png", f"image ROC per class, {score} score, "
            f"after {last}"
        )
    gal = np.load(eval_dir / last / "gallery.npz")
    root = Path(params.data.root)
    rows_g = []
    for cls in params.classes:
        k = 0
        while f"{cls}/{k}/name" in gal:
            name = str(gal[f"{cls}/{k}/name"])
            mask = gal[f"{cls}/{k}/mask"]
            image = load_image(root / name, mask.shape[0])
            nf_auroc = results[-1]["per_class"][cls]["nf"]["pixel_auroc"]
            rows_g.append(
                GalleryRow(
                    image=image,
                    mask=mask,
                    anomaly_map=gal[f"{cls}/{k}/nf"],
                    caption=f"{cls}: {Path(name).parent.name} (nf pixel AUROC {nf_auroc:.3f})",
                )
            )
            k += 1
    if rows_g:
        plot_gallery(rows_g, plots_dir / "gallery.png", f"nf anomaly maps after {last}")
    return summary
