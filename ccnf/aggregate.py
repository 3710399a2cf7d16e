"""Aggregate per-task evaluations into the study's metrics and plots.

R[t][j] (metric of task j after training task t) per score and metric; final average =
mean_j R[T-1][j]; forgetting = mean_{j<T-1} max_{t in [j, T-2]} R[t][j] - R[T-1][j].
Everything is computed for the task-aware block (oracle class) and the task-agnostic one
(class chosen by ``score.class_select``, see :mod:`ccnf.evaluate`).

Writes (all small, git-tracked):
    metrics/summary.json    {score: {image_auroc, pixel_auroc, aupro, image_ap, image_f1max,
                             image_forgetting, pixel_forgetting, aupro_forgetting,
                             image_diagonal, pixel_diagonal, aupro_diagonal (mean R[j][j]),
                             image_{precision,recall,f1}_{kstd,pct}, image_ap_chance,
                             image_f1_all, image_normal_flagged_{kstd,pct},
                             {image,pixel}_auroc_worst_class,
                             {image,pixel}_auroc_over_classes},     (task-aware)
                             "agnostic": {score: same keys},
                             "class_select": {"method", "accuracy", "forgetting",
                                              "likelihood_accuracy", "prototype_accuracy"}}
                            (the two *_accuracy entries only when a selection pass ran)
    metrics/matrices.json   {score: {metric: R}, "agnostic": {score: {metric: R}},
                             "class_select": {"accuracy": R, "likelihood": R, ...}}
                            (R as nested lists, null above the diagonal)
    metrics/per_class.json  final model, {class: {"task": j, score: {metric: value},
                                                  "agnostic": {"selection_accuracy": a,
                                                               "selected": {class: n},
                                                               score: {metric: value}}}}
                            ("selected" and the per-method accuracies only when a selection
                            pass ran)
    plots/*.png, plots/loss.tsv
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ccnf.atomic import write_json, write_text
from ccnf.config import Params
from ccnf.data.images import load_image
from ccnf.errors import CcnfError
from ccnf.metrics import (
    backward_transfer,
    diagonal_average,
    forgetting,
    roc_curve,
    step_average,
)
from ccnf.names import ALL_METRICS, DECIMALS, SCORES, SELECT_METHODS
from ccnf.plots import (
    GalleryRow,
    plot_gallery,
    plot_loss_curves,
    plot_matrices,
    plot_roc_curves,
    plot_task_curves,
)
from ccnf.records import ClassScores, GalleryItem, TaskResult
from ccnf.report import stale_scores
from ccnf.store import load_npz, read_json, recovery_fix

FORGETTING_OF = {"image_auroc": "image", "pixel_auroc": "pixel", "aupro": "aupro"}


def load_task_results(params: Params, metrics_dir: Path) -> list[TaskResult]:
    results = []
    for task in params.task_names:
        path = metrics_dir / "tasks" / f"{task}.json"
        if not path.is_file():
            raise CcnfError(f"evaluation of task {task} missing: {path}", fix="dvc repro")
        raw = read_json(path, what=f"evaluation of task {task}")
        results.append(TaskResult.from_json(raw, path, task))
    methods = {r.class_select for r in results}
    if len(methods) > 1:
        raise CcnfError(
            f"the task evaluations used different score.class_select values: {sorted(methods)}",
            where=str(metrics_dir / "tasks"),
            fix="re-run the evaluations with one setting: dvc repro",
        )
    return results


def _agnostic_per_task(res: TaskResult) -> dict[str, Any] | None:
    """The agnostic block's per-task metrics (the task-aware ones under oracle selection);
    None for a task whose agnostic block was skipped (``eval.agnostic_every_task: false``)."""
    agn = res.agnostic
    if agn.get("skipped"):
        return None
    return res.per_task if agn["same_as_aware"] else agn["per_task"]


def scores_of(results: list[TaskResult]) -> list[str]:
    """The score definitions the evaluations report (all three for CCNF, nf for a baseline)."""
    first = next(iter(results[-1].per_task.values()))
    return [s for s in SCORES if s in first]


def _score_matrices(per_task_of: list[dict[str, Any] | None], task_names: list[str]) -> dict:
    """Rows of skipped evaluations (None) stay NaN."""
    n = len(task_names)
    present = next(p for p in reversed(per_task_of) if p is not None)
    first = next(iter(present.values()))
    out: dict[str, dict[str, np.ndarray]] = {}
    for score in [s for s in SCORES if s in first]:
        out[score] = {}
        for metric in ALL_METRICS:
            r = np.full((n, n), np.nan)
            for t, per_task in enumerate(per_task_of):
                if per_task is None:
                    continue
                for j, tname in enumerate(task_names[: t + 1]):
                    r[t, j] = per_task[tname][score][metric]
            out[score][metric] = r
    return out


def matrices(results: list[TaskResult], task_names: list[str]) -> dict[str, dict]:
    """Task-aware {score: {metric: R (T, T)}} with NaN above the diagonal."""
    return _score_matrices([r.per_task for r in results], task_names)


def agnostic_matrices(results: list[TaskResult], task_names: list[str]) -> dict[str, dict]:
    """Task-agnostic {score: {metric: R (T, T)}}."""
    return _score_matrices([_agnostic_per_task(r) for r in results], task_names)


def selection_matrices(
    results: list[TaskResult], task_names: list[str]
) -> dict[str, np.ndarray]:
    """Class-selection accuracy R (T, T): {"accuracy": configured method, method: R, ...}.

    Oracle selection is right by definition (R = 1); per-method matrices exist only when a
    selection pass ran (any method other than oracle).
    """
    n = len(task_names)
    final = results[-1].agnostic
    ran = not final["same_as_aware"]
    methods = (
        list(next(iter(final["per_task"].values()))["selection_accuracy_by_method"])
        if ran
        else []
    )
    keys = ["accuracy", *methods]
    out = {k: np.full((n, n), np.nan) for k in keys}
    for t, res in enumerate(results):
        if res.agnostic.get("skipped"):
            continue
        for j, tname in enumerate(task_names[: t + 1]):
            if not ran:
                out["accuracy"][t, j] = 1.0
                continue
            entry = res.agnostic["per_task"][tname]
            out["accuracy"][t, j] = entry["selection_accuracy"]
            for m in methods:
                out[m][t, j] = entry["selection_accuracy_by_method"][m]
    return out


def _complete(r: np.ndarray) -> bool:
    return bool(np.isfinite(r[np.tril_indices(r.shape[0])]).all())


def _final(r: np.ndarray) -> float:
    """Final average; only the last row is needed, so it works when earlier rows were skipped."""
    return float(np.mean(r[-1]))


def summarize(mats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """{score: {metric: final average (after the last task), <short>_forgetting: forgetting,
    <short>_diagonal: mean of R[j][j] (each task right after it was learned),
    <short>_step_average: the mean over steps of the seen-task average (A-AUROC of the IUF and
    CDAD tables), <short>_bwt: backward transfer}}, rounded to 1e-6 (short: image, pixel,
    aupro)."""
    summary: dict[str, dict[str, float]] = {}
    for score, by_metric in mats.items():
        entry = {m: round(_final(r), DECIMALS) for m, r in by_metric.items()}
        for metric, short in FORGETTING_OF.items():
            r = by_metric[metric]
            if _complete(r):  # these need every task's evaluation
                entry[f"{short}_forgetting"] = round(forgetting(r), DECIMALS)
                entry[f"{short}_diagonal"] = round(diagonal_average(r), DECIMALS)
                entry[f"{short}_step_average"] = round(step_average(r), DECIMALS)
                entry[f"{short}_bwt"] = round(backward_transfer(r), DECIMALS)
        summary[score] = entry
    return summary


def summarize_memory(results: list[TaskResult], params: Params) -> dict[str, float]:
    """What the model keeps after the last task, and what each later task added to it.

    bytes / values: every tensor of the final model; first_task_bytes: after task 0;
    added_bytes_per_task / added_bytes_per_class / added_values_per_task: (final - after task
    0) over the later tasks / their classes (parameter isolation's cost; a bank's per-class
    model); stored_images: training images of earlier tasks kept (replay). Empty for records
    without footprints (older evaluations).
    """
    if not all(r.footprint for r in results):
        return {}
    first, last = results[0].footprint, results[-1].footprint
    later_tasks = len(results) - 1
    later_classes = sum(len(c) for c in params.split[1:len(results)])
    added = last["bytes"] - first["bytes"]
    return {
        "bytes": last["bytes"],
        "values": last["values"],
        "first_task_bytes": first["bytes"],
        "added_bytes_per_task": round(added / later_tasks, 1) if later_tasks else 0.0,
        "added_bytes_per_class": round(added / later_classes, 1) if later_classes else 0.0,
        "added_values_per_task": (round((last["values"] - first["values"]) / later_tasks, 1)
                                  if later_tasks else 0.0),
        "stored_images": last["stored_images"],
    }


def summarize_test_selected(results: list[TaskResult]) -> dict[str, Any]:
    """LEAKY (``eval.test_selected``): after the last task and averaged over the steps (the
    A-AUROC of the test-selected models), each model chosen on the test set; empty when off.
    The headline figures beside it are the final models', whatever this says."""
    if not all(r.test_selected for r in results):
        return {}
    last = results[-1].test_selected
    return {
        "leaky": True,
        "selected_on": "test set",
        "score": last["score"],
        "image_auroc": last["image_auroc"],
        "pixel_auroc": last["pixel_auroc"],
        **{f"{m}_step_average": round(float(np.mean([r.test_selected[f"{m}_auroc"]
                                                        for r in results])), DECIMALS)
           for m in ("image", "pixel")},
    }


def final_class_figures(last: TaskResult) -> dict[str, dict[str, float]]:
    """Per score, two summaries over the final model's classes (task-aware), for image and
    pixel AUROC:

    * ``<metric>_worst_class``: the lowest class (a forgotten class hides in an average);
    * ``<metric>_over_classes``: the mean over classes. The final average weighs each task
      equally, so with tasks of unequal size (10-5, 14-1, 3-3-2-2-2) a class of a small task
      counts more; this is the mean the papers' per-class tables end in. With equal tasks the
      two are the same number.
    """
    per_class = list(last.per_class.values())
    metrics = ("image_auroc", "pixel_auroc")
    out: dict[str, dict[str, float]] = {}
    for s in [s for s in SCORES if s in per_class[0]]:
        values = {m: [c[s][m] for c in per_class] for m in metrics}
        out[s] = {f"{m}_worst_class": round(min(values[m]), DECIMALS) for m in metrics} | {
            f"{m}_over_classes": round(float(np.mean(values[m])), DECIMALS) for m in metrics}
    return out


def summarize_selection(method: str, sel: dict[str, np.ndarray]) -> dict[str, Any]:
    """{"method", "accuracy": final average, "forgetting", "<method>_accuracy": final avg}."""
    out: dict[str, Any] = {
        "method": method,
        "accuracy": round(_final(sel["accuracy"]), DECIMALS),
    }
    if _complete(sel["accuracy"]):
        out["forgetting"] = round(forgetting(sel["accuracy"]), DECIMALS)
    for m in SELECT_METHODS:
        if m in sel:
            out[f"{m}_accuracy"] = round(_final(sel[m]), DECIMALS)
    return out


def _final_per_class(last: TaskResult) -> dict[str, Any]:
    """Per-class metrics of the final model, each class with its agnostic entry nested."""
    agn = last.agnostic
    out = {}
    for cls, entry in last.per_class.items():
        if agn["same_as_aware"]:
            nested = {"selection_accuracy": 1.0} | {s: entry[s] for s in SCORES if s in entry}
        else:
            a = agn["per_class"][cls]
            nested = {k: v for k, v in a.items() if k != "task"}
        out[cls] = entry | {"agnostic": nested, "stale_calibration": stale_scores(entry)}
    return out


def _json_matrix(r: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else round(float(v), DECIMALS) for v in row] for row in r]


def _loss_rows(models_dir: Path, task_names: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for task in task_names:
        path = models_dir / task / "train_log.tsv"
        if not path.is_file():
            raise CcnfError(f"training log missing: {path}", fix="dvc repro")
        try:
            with path.open(encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    rows.append({k: float(v) for k, v in row.items() if v != ""})
        except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as err:
            # a cut-off row has None cells (TypeError), a damaged one non-numbers
            raise CcnfError(f"training log {path} is truncated or corrupt ({err})",
                            where=str(path), fix=recovery_fix(path)) from None
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
    headline = params.score.headline
    results = load_task_results(params, metrics_dir)
    method = results[-1].class_select
    mats = matrices(results, task_names)
    agn_mats = agnostic_matrices(results, task_names)
    sel = selection_matrices(results, task_names)
    scores = scores_of(results)
    summary: dict[str, Any] = summarize(mats)
    for score, entry in final_class_figures(results[-1]).items():
        summary[score] |= entry
    summary["agnostic"] = summarize(agn_mats)
    summary["class_select"] = summarize_selection(method, sel)
    memory = summarize_memory(results, params)
    if memory:
        summary["memory"] = memory
    leaky = summarize_test_selected(results)
    if leaky:
        summary["test_selected_leaky"] = leaky
    write_json(metrics_dir / "summary.json", summary)
    as_lists = {s: {m: _json_matrix(r) for m, r in by_m.items()} for s, by_m in mats.items()}
    write_json(
        metrics_dir / "matrices.json",
        as_lists
        | {
            "agnostic": {
                s: {m: _json_matrix(r) for m, r in by_m.items()} for s, by_m in agn_mats.items()
            },
            "class_select": {k: _json_matrix(r) for k, r in sel.items()},
        },
    )
    write_json(metrics_dir / "per_class.json", _final_per_class(results[-1]))

    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_task_curves(
        {f"{s} {m.replace('_', ' ')}": mats[s][m] for s in scores for m in ("image_auroc",
                                                                           "pixel_auroc")},
        task_names,
        plots_dir / "task_curves.png",
        "AUROC of each task after each training task",
    )
    for metric in ("image_auroc", "pixel_auroc"):
        plot_matrices(
            {s: mats[s][metric] for s in scores},
            task_names,
            plots_dir / f"R_{metric}.png",
            f"R[t][j]: {metric.replace('_', ' ')} of task j after task t",
        )
    plot_matrices(
        {s: agn_mats[s]["image_auroc"] for s in scores},
        task_names,
        plots_dir / "R_agnostic_image_auroc.png",
        f"R[t][j]: task-agnostic image AUROC (class by {method})",
    )
    by_method = {m: sel[m] for m in SELECT_METHODS if m in sel} or {method: sel["accuracy"]}
    plot_matrices(
        by_method,
        task_names,
        plots_dir / "R_class_select.png",
        f"R[t][j]: class-selection accuracy on task j after task t (used: {method})",
    )
    rows = _loss_rows(models_dir, task_names)
    _write_tsv(plots_dir / "loss.tsv", rows)
    if rows:  # a model without a training loop (model.kind=gaussian) has no loss to plot
        plot_loss_curves(rows, plots_dir / "loss_curves.png", "training loss terms (all tasks)")

    last = task_names[-1]
    raw_path = eval_dir / last / "image_scores.npz"
    raw = load_npz(raw_path, kind="image_scores", what="image scores")
    per_class_scores = {cls: ClassScores.from_arrays(raw, cls, scores, raw_path)
                        for cls in params.classes}
    for score in scores:
        curves = {}
        for cls, rec in per_class_scores.items():
            fpr, tpr, _ = roc_curve(rec.labels, rec.scores[score])
            curves[cls] = (fpr, tpr, results[-1].per_class[cls][score]["image_auroc"])
        plot_roc_curves(
            curves, plots_dir / f"roc_{score}.png", f"image ROC per class, {score} score, "
            f"after {last}"
        )
    gal_path = eval_dir / last / "gallery.npz"
    gal = load_npz(gal_path, kind="gallery", what="anomaly-map gallery")
    root = Path(params.data.root)
    rows_g = []
    for item in GalleryItem.read_all(gal, params.classes, [headline], gal_path):
        image = load_image(root / item.name, item.mask.shape[0])
        h_auroc = results[-1].per_class[item.cls][headline]["pixel_auroc"]
        rows_g.append(
            GalleryRow(
                image=image,
                mask=item.mask,
                anomaly_map=item.maps[headline],
                caption=f"{item.cls}: {Path(item.name).parent.name} ({headline} pixel AUROC "
                f"{h_auroc:.3f})",
            )
        )
    if rows_g:
        plot_gallery(rows_g, plots_dir / "gallery.png", f"{headline} anomaly maps after {last}")
    return summary
