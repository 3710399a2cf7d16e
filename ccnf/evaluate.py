"""Evaluation after task t: every class of every seen task j <= t, every score, one pass.

Two settings are reported side by side (DESIGN.md sections 4 and 5):

* task-aware: each test image is scored under its true class (oracle selection);
* task-agnostic: under the class chosen by ``score.class_select`` among all classes seen so
  far (likelihood | prototype); hybrid scores, calibrated scores and thresholds then use the
  *selected* class's calibration record. With ``class_select: oracle`` the block is the
  task-aware one and is not recomputed.

Output of :func:`evaluate_task` (``metrics/tasks/<task>.json``)::

    {"task": "t2", "task_index": 2, "class_select": "likelihood",
     "thresholds": {"k": 3.0, "percentile": 99.0,
                    "per_class": {cls: {score: {"kstd": t, "pct": t}}}},
     "per_class": {cls: {"task": j, score: {metric: value}}},           # task-aware
     "per_task":  {"t0": {score: {metric: mean over the task's classes}}, ...},
     "agnostic": {                                                      # task-agnostic
         "class_select": "likelihood", "same_as_aware": false,
         "selection_accuracy": mean over seen classes,
         "selection_accuracy_by_method": {"likelihood": a, "prototype": a},
         "per_class": {cls: {"task": j, "selection_accuracy": a,
                             "selection_accuracy_by_method": {method: a},
                             "selected": {class: count}, score: {metric: value}}},
         "per_task": {"t0": {"selection_accuracy": a,
                             "selection_accuracy_by_method": {method: a},
                             score: {metric: value}}, ...}}}

With ``class_select: oracle`` the agnostic block is ``{"class_select": "oracle",
"same_as_aware": true, "selection_accuracy": 1.0}``. When only one class has been seen, no
selection pass runs (every method can only pick that class): the block has the full layout
above, with selection accuracy 1 and the task-aware metrics. Both selection statistics come from one
flow pass, so the accuracy of the method not chosen is reported for free.

Metrics per class and score: image AUROC, pixel AUROC, AUPRO, image AP, image F1-max
(:data:`METRICS`) and precision / recall / F1 of the rule score >= threshold at the two
automatic thresholds of :func:`ccnf.scoring.thresholds` (:data:`THRESHOLD_METRICS`).
Selection accuracy of a class = fraction of its test images whose selected class is the true
one; of a task = mean over its classes.

Also writes ``eval/<task>/``: raw image scores (ROC curves; :class:`ccnf.records.ClassScores`
per class, the agnostic block's included) and a few anomaly maps (gallery,
:class:`ccnf.records.GalleryItem`). The JSON is :class:`ccnf.records.TaskResult`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from ccnf.atomic import atomic_path, write_json
from ccnf.config import Params
from ccnf.device import resolve_device
from ccnf.errors import CcnfError
from ccnf.features import FeatureMeta, load_inputs
from ccnf.metrics import aupro, auroc, average_precision, f1_max, precision_recall_f1_at
from ccnf.models import read_checkpoint, restore_model
from ccnf.models.base import SNAPSHOTS
from ccnf.names import (
    DECIMALS,
    SCORES,
    THRESHOLD_KINDS,
)
from ccnf.records import ClassScores, GalleryItem, TaskResult
from ccnf.scoring import (
    assemble,
    calibration_record,
    fusion_stats_of,
    image_scores,
    pixel_maps,
    stack_stats,
    thresholds,
)
from ccnf.seeding import seed_everything
from ccnf.store import save_npz


def _round(v: float) -> float:
    return round(float(v), DECIMALS)


def class_metrics(
    labels: np.ndarray,
    masks: np.ndarray,
    images: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    fpr_limit: float,
    image_thresholds: dict[str, dict[str, np.ndarray | float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Every metric of section 5 for every score of one class's test set.

    labels (N,) 0/1; masks (N, S, S) bool; images[score] (N,); maps[score] (N, S, S);
    image_thresholds[score][kind] (kind in kstd | pct): one threshold, or (N,) per image (each
    image compared with the threshold of the class it was scored under). Without thresholds
    only :data:`METRICS` are computed.

    Beside the threshold metrics stand their chance levels (:data:`CHANCE_METRICS`): the AP of
    a random ranking (= the defect rate r) and the F1 of flagging every image (2r / (1 + r)),
    and ``image_normal_flagged_<kind>``, the fraction of the normal test images at or above
    the threshold: above one half the class's calibration has gone stale.
    """
    out = {}
    rate = float(np.mean(labels))
    chance = {"image_ap_chance": rate, "image_f1_all": 2 * rate / (1 + rate)}
    for name in [s for s in SCORES if s in images]:
        values = {
            "image_auroc": auroc(labels, images[name]),
            "pixel_auroc": auroc(masks, maps[name]),
            "aupro": aupro(masks, maps[name], fpr_limit=fpr_limit),
            "image_ap": average_precision(labels, images[name]),
            "image_f1max": f1_max(labels, images[name])[0],
        }
        if image_thresholds is not None:
            values |= chance
            for kind in THRESHOLD_KINDS:
                thr = np.asarray(image_thresholds[name][kind], dtype=np.float64)
                # s >= t  <=>  s - t >= 0 exactly in IEEE arithmetic, so per-image thresholds
                # reuse the scalar rule
                margin = images[name] - thr
                p, r, f = precision_recall_f1_at(labels, margin, 0.0)
                values |= {
                    f"image_precision_{kind}": p,
                    f"image_recall_{kind}": r,
                    f"image_f1_{kind}": f,
                    f"image_normal_flagged_{kind}": float(np.mean(margin[labels == 0] >= 0)),
                }
        out[name] = {k: _round(v) for k, v in values.items()}
    return out


def _task_means(
    per_class: dict[str, Any], split: list[list[str]], seen_tasks: list[str]
) -> dict[str, Any]:
    """{task: {score: {metric: mean over the task's classes}}} (+ selection accuracy if any)."""
    per_task: dict[str, Any] = {}
    for j, tname in enumerate(seen_tasks):
        entries = [per_class[c] for c in split[j]]
        task: dict[str, Any] = {}
        if "selection_accuracy" in entries[0]:
            task["selection_accuracy"] = _round(np.mean([e["selection_accuracy"] for e in entries]))
            task["selection_accuracy_by_method"] = {
                m: _round(np.mean([e["selection_accuracy_by_method"][m] for e in entries]))
                for m in entries[0]["selection_accuracy_by_method"]
            }
        for name in [s for s in SCORES if s in entries[0]]:
            metrics = entries[0][name]
            task[name] = {m: _round(np.mean([e[name][m] for e in entries])) for m in metrics}
        per_task[tname] = task
    return per_task


def _image_thresholds(
    thr: dict[str, dict[str, dict[str, float]]], names: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """{score: {kind: (N,) threshold of the class image i is scored under}}."""
    return {
        s: {kind: np.array([thr[n][s][kind] for n in names]) for kind in THRESHOLD_KINDS}
        for s in thr[names[0]]
    }


@dataclass
class _ClassResult:
    """What evaluating one class yields (merged by :func:`evaluate_task` in job order)."""

    aware: dict[str, Any]
    agnostic: dict[str, Any] | None
    raw: ClassScores
    gallery: list[GalleryItem]
    timing: dict[str, float]


class _ClassEvaluator:
    """The checkpoint of one task, ready to score the test set of any seen class.

    Built once per process: in the stage's process, or in each worker of the pool.
    """

    def __init__(self, params: Params, task: str, features_dir: Path, model_dir: Path,
                 aware_only: bool = False) -> None:
        self.params, self.features_dir = params, features_dir
        torch.set_num_threads(params.threads)
        seed_everything(params.seed)
        t = params.task_index(task)
        ckpt = read_checkpoint(model_dir)
        self.where = where = str(model_dir / "model.pt")
        sc = self.sc = params.score
        self.model = restore_model(ckpt, params, FeatureMeta.load(features_dir),
                                   resolve_device(params.device), where=where)
        known = len(self.model.classes)
        self.calibration = {
            cls: calibration_record(rec, sc, params.data.mask_size, cls=cls, where=where)
            for cls, rec in ckpt["calibration"].items()
        }
        last = t == len(params.task_names) - 1
        self.agnostic = (not aware_only and sc.class_select != "oracle"
                         and (last or params.eval.agnostic_every_task))
        self.seen = [c for j in range(t + 1) for c in params.split[j]]
        if known < len(self.seen):
            raise CcnfError(
                f"checkpoint {model_dir} knows {known} classes, task {task} needs "
                f"{len(self.seen)}",
                fix="the task split changed since training: dvc repro",
            )
        k, pct = params.eval.threshold_k, params.eval.threshold_percentile
        self.thr = {
            c: thresholds(self.calibration[c], sc.alpha, sc.calibrated, k, pct, cls=c,
                          where=where)
            for c in self.seen
        }

    def _outputs(
        self, feats: list[torch.Tensor], names: list[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Image scores and maps of images scored under classes ``names`` (one per image)."""
        sc, mask_size, batch = self.sc, self.params.data.mask_size, self.params.eval.batch_images
        patches = self.model.patch_scores(feats, names, batch)
        st = stack_stats(self.calibration, names)
        scores = assemble(patches, sc, mask_size, fusion_stats_of(st))
        return (
            image_scores(scores, st, sc.alpha, sc.calibrated),
            pixel_maps(scores, st, sc.alpha, sc.calibrated),
        )

    def __call__(self, job: tuple[int, str]) -> _ClassResult:
        """Evaluate class ``cls`` of task ``j``: task-aware and (if due) task-agnostic."""
        j, cls = job
        params, sc, fpr = self.params, self.sc, self.params.eval.aupro_fpr
        split = load_inputs(self.features_dir, cls, "test", params.features.neighbourhood)
        cid = self.seen.index(cls)  # selections are indices into the seen classes
        labels = split.labels.numpy()
        assert split.masks is not None
        masks = split.masks.numpy()
        timing = {"aware": 0.0, "selection": 0.0}
        start = time.perf_counter()
        images, maps = self._outputs(split.features, [cls] * len(split))
        timing["aware"] += time.perf_counter() - start
        aware = {"task": j} | class_metrics(
            labels, masks, images, maps, fpr, _image_thresholds(self.thr, [cls])
        )
        raw = ClassScores(labels, dict(images))
        agnostic = None
        if self.agnostic:
            start = time.perf_counter()
            if len(self.seen) == 1:
                # one class seen: every method picks it, so there is no selection pass to run
                # (the block equals the task-aware one, as a pass would have found)
                by_method = {m: np.zeros(len(split), dtype=np.int64)
                             for m in self.model.select_methods}
            else:
                by_method = self.model.select(split.features, self.seen,
                                              params.eval.batch_images, sc.select_level)
            selected = by_method[sc.class_select]
            names = [self.seen[i] for i in selected]
            wrong = np.flatnonzero(selected != cid)
            a_images = {s: v.copy() for s, v in images.items()}
            a_maps = {s: v.copy() for s, v in maps.items()}
            if wrong.size:  # right picks keep their task-aware scores: no second pass
                w_images, w_maps = self._outputs(
                    [f[torch.from_numpy(wrong)] for f in split.features],
                    [names[i] for i in wrong],
                )
                for s in a_images:
                    a_images[s][wrong] = w_images[s]
                    a_maps[s][wrong] = w_maps[s]
            timing["selection"] += time.perf_counter() - start
            picked, counts = np.unique(selected, return_counts=True)
            agnostic = {
                "task": j,
                "selection_accuracy": _round(np.mean(selected == cid)),
                "selection_accuracy_by_method": {
                    m: _round(np.mean(s_ == cid)) for m, s_ in by_method.items()
                },
                "selected": {
                    self.seen[int(i)]: int(n) for i, n in zip(picked, counts, strict=True)
                },
            } | class_metrics(
                labels, masks, a_images, a_maps, fpr, _image_thresholds(self.thr, names)
            )
            raw.selected, raw.agnostic = selected, a_images
        defective = np.flatnonzero(labels == 1)[: params.eval.gallery_per_class]
        gallery = [
            GalleryItem(cls, kk, split.names[i], masks[i], {s: m[i] for s, m in maps.items()})
            for kk, i in enumerate(defective)
        ]
        return _ClassResult(aware, agnostic, raw, gallery, timing)


# the evaluator of a pool worker (each forked worker builds its own), or why it could not
_WORKER: _ClassEvaluator | None = None
_WORKER_FAILED = False


def _init_worker(params: Params, task: str, features_dir: Path, model_dir: Path,
                 aware_only: bool) -> None:
    global _WORKER, _WORKER_FAILED
    try:
        _WORKER = _ClassEvaluator(params, task, features_dir, model_dir, aware_only)
    except Exception:
        # a raising initializer makes the pool respawn workers forever; the stage's process
        # builds the same evaluator and reports the error itself
        _WORKER_FAILED = True


def _run_in_worker(job: tuple[int, str]) -> _ClassResult:
    if _WORKER is None:
        raise RuntimeError(f"evaluation worker could not load the checkpoint (failed: "
                           f"{_WORKER_FAILED})")
    return _WORKER(job)


def _worker_pool(params: Params, n_jobs: int, init_args: tuple) -> Any:
    """A fork pool of ``eval.workers`` processes, or None to evaluate in this process.

    Classes are independent and each is scored with the same ops in whichever process, so the
    results do not depend on the pool (the tests check it). The pool is forked before this
    process runs any torch op, and only for the CPU: a fork after CUDA or OpenMP start-up is
    unsafe, and on a GPU the classes queue on one device anyway.
    """
    workers = min(params.eval.workers, n_jobs)
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return None
    if resolve_device(params.device).type != "cpu":
        return None
    return mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args)


def _evaluate_classes(
    params: Params, task: str, features_dir: Path, model_dir: Path,
    jobs: list[tuple[int, str]], what: str, console: Console | None, *, aware_only: bool = False,
) -> tuple[_ClassEvaluator, list[_ClassResult]]:
    """Every job (task index, class) with ``model_dir``'s checkpoint, in ``eval.workers``
    processes; ``aware_only`` skips the task-agnostic block."""
    init_args = (params, task, features_dir, model_dir, aware_only)
    pool = _worker_pool(params, len(jobs), init_args)
    try:
        ev = _ClassEvaluator(*init_args)
        results = pool.imap(_run_in_worker, jobs) if pool is not None else map(ev, jobs)
        done = list(track(results, total=len(jobs), description=what, console=console,
                          disable=console is None))
    finally:
        if pool is not None:
            pool.terminate()
    return ev, done


def test_selected_block(
    params: Params, task: str, features_dir: Path, model_dir: Path,
    per_class: dict[str, Any], console: Console | None = None,
) -> dict[str, Any]:
    """LEAKY (``eval.test_selected``): the snapshot of the task's training (or the final model)
    whose mean image AUROC over the seen tasks is best on the test set, as UCAD, CDAD and IUF
    choose their epoch. Only for lining our figures up with theirs; never a headline."""
    t = params.task_index(task)
    seen_tasks = params.task_names[: t + 1]
    jobs = [(j, cls) for j in range(t + 1) for cls in params.split[j]]
    score = params.score.headline

    def figures(name: str, classes: dict[str, Any]) -> dict[str, Any]:
        """Mean over the seen tasks of each task's class mean (the final-average definition)."""
        means = _task_means(classes, params.split, seen_tasks)
        return {"model": name} | {
            m: _round(np.mean([means[tk][score][m] for tk in seen_tasks]))
            for m in ("image_auroc", "pixel_auroc")
        }

    candidates = []
    snapshot_root = model_dir / SNAPSHOTS
    for snap in sorted(snapshot_root.iterdir()) if snapshot_root.is_dir() else []:
        _, done = _evaluate_classes(params, task, features_dir, snap, jobs,
                                    f"leaky: {task} {snap.name}", console, aware_only=True)
        classes = {cls: r.aware for (_, cls), r in zip(jobs, done, strict=True)}
        candidates.append(figures(snap.name, classes))
    candidates.append(figures("final", per_class))
    best = max(candidates, key=lambda c: c["image_auroc"])  # the first of equals
    return {"leaky": True, "selected_on": "test set", "score": score,
            "by": "mean image AUROC over the seen tasks", "candidates": candidates, **best}


def evaluate_task(
    params: Params,
    task: str,
    features_dir: Path,
    model_dir: Path,
    out_json: Path,
    eval_dir: Path,
    *,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint of ``task`` on every seen class; write out_json and eval_dir.

    Classes are evaluated in ``eval.workers`` processes. Returns the JSON's content plus
    ``"timing_s"`` (seconds of the task-aware scoring and of the task-agnostic selection and
    re-scoring, summed over the classes), which stays out of the file so that re-runs write
    identical bytes.
    """
    t = params.task_index(task)
    jobs = [(j, cls) for j in range(t + 1) for cls in params.split[j]]
    ev, done = _evaluate_classes(params, task, features_dir, model_dir, jobs,
                                 f"evaluate after {task}", console)
    seen_tasks = params.task_names[: t + 1]
    method, seen, thr = params.score.class_select, ev.seen, ev.thr
    per_class = {cls: r.aware for (_, cls), r in zip(jobs, done, strict=True)}
    agn_class = {cls: r.agnostic for (_, cls), r in zip(jobs, done, strict=True) if r.agnostic}
    raw = {k: v for (_, cls), r in zip(jobs, done, strict=True)
           for k, v in r.raw.to_arrays(cls).items()}
    gallery = {k: v for r in done for item in r.gallery for k, v in item.to_arrays().items()}
    timing = {k: sum(r.timing[k] for r in done) for k in ("aware", "selection")}
    result = TaskResult(
        task=task,
        task_index=t,
        class_select=method,
        thresholds={
            "k": params.eval.threshold_k,
            "percentile": params.eval.threshold_percentile,
            "per_class": {
                c: {s: {kind: _round(v) for kind, v in by.items()} for s, by in thr[c].items()}
                for c in seen
            },
        },
        per_class=per_class,
        per_task=_task_means(per_class, params.split, seen_tasks),
        agnostic={},
        footprint=ev.model.footprint(),
    )
    if params.eval.test_selected > 0:
        result.test_selected = test_selected_block(params, task, features_dir, model_dir,
                                                   per_class, console)
    if method == "oracle":
        result.agnostic = {
            "class_select": "oracle", "same_as_aware": True, "selection_accuracy": 1.0
        }
    elif not ev.agnostic:
        result.agnostic = {"class_select": method, "same_as_aware": False, "skipped": True}
    else:
        methods = list(agn_class[seen[0]]["selection_accuracy_by_method"])
        result.agnostic = {
            "class_select": method,
            "same_as_aware": False,
            "selection_accuracy": _round(
                np.mean([agn_class[c]["selection_accuracy"] for c in seen])
            ),
            "selection_accuracy_by_method": {
                m: _round(np.mean([agn_class[c]["selection_accuracy_by_method"][m] for c in seen]))
                for m in methods
            },
            "per_class": agn_class,
            "per_task": _task_means(agn_class, params.split, seen_tasks),
        }
    with atomic_path(eval_dir) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "image_scores.npz", raw, kind="image_scores")
        save_npz(tmp / "gallery.npz", gallery, kind="gallery")
    write_json(out_json, result.to_json())
    return result.to_json() | {"timing_s": {k_: round(v, 3) for k_, v in timing.items()}}
