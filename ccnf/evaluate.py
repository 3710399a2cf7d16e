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
"same_as_aware": true, "selection_accuracy": 1.0}``. Both selection statistics come from one
flow pass, so the accuracy of the method not chosen is reported for free.

Metrics per class and score: image AUROC, pixel AUROC, AUPRO, image AP, image F1-max
(:data:`METRICS`) and precision / recall / F1 of the rule score >= threshold at the two
automatic thresholds of :func:`ccnf.scoring.thresholds` (:data:`THRESHOLD_METRICS`).
Selection accuracy of a class = fraction of its test images whose selected class is the true
one; of a task = mean over its classes.

Also writes ``eval/<task>/``: raw image scores (ROC curves; ``<cls>/agnostic/<score>`` and
``<cls>/selected`` for the agnostic block) and a few anomaly maps (gallery).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from ccnf.atomic import atomic_path, write_json
from ccnf.baselines import ClassBank, model_spec
from ccnf.baselines import score_images as score_bank_images
from ccnf.config import Params, ScoreConfig
from ccnf.device import resolve_device
from ccnf.errors import CcnfError
from ccnf.features import FeatureMeta, load_split
from ccnf.flows.ccnf import CCNF, read_checkpoint
from ccnf.metrics import aupro, auroc, average_precision, f1_max, precision_recall_f1_at
from ccnf.scoring import (
    SCORES,
    SELECT_METHODS,
    Scores,
    calibration_record,
    class_statistics,
    image_scores,
    pixel_maps,
    pool,
    score_images,
    stack_stats,
    thresholds,
)
from ccnf.seeding import seed_everything

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1max")
THRESHOLD_KINDS = ("kstd", "pct")
THRESHOLD_METRICS = tuple(
    f"image_{m}_{kind}" for kind in THRESHOLD_KINDS for m in ("precision", "recall", "f1")
)
ALL_METRICS = METRICS + THRESHOLD_METRICS
DECIMALS = 6


def _round(v: float) -> float:
    # reported to 1e-6: float32 map noise (seen at the 1e-8 level between runs) stays out
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
    """
    out = {}
    for name in [s for s in SCORES if s in images]:
        values = {
            "image_auroc": auroc(labels, images[name]),
            "pixel_auroc": auroc(masks, maps[name]),
            "aupro": aupro(masks, maps[name], fpr_limit=fpr_limit),
            "image_ap": average_precision(labels, images[name]),
            "image_f1max": f1_max(labels, images[name])[0],
        }
        if image_thresholds is not None:
            for kind in THRESHOLD_KINDS:
                thr = np.asarray(image_thresholds[name][kind], dtype=np.float64)
                # s >= t  <=>  s - t >= 0 exactly in IEEE arithmetic, so per-image thresholds
                # reuse the scalar rule
                p, r, f = precision_recall_f1_at(labels, images[name] - thr, 0.0)
                values |= {
                    f"image_precision_{kind}": p,
                    f"image_recall_{kind}": r,
                    f"image_f1_{kind}": f,
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


def _bank_scores(
    bank: ClassBank, cls_of: list[str], features: list[torch.Tensor], cfg: ScoreConfig,
    mask_size: int, batch_images: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, S, S) and image scores (N,) of N images, image i under bank model cls_of[i]."""
    n = features[0].shape[0]
    maps = np.zeros((n, mask_size, mask_size), dtype=np.float32)
    for name in dict.fromkeys(cls_of):
        idx = torch.tensor([i for i, c in enumerate(cls_of) if c == name])
        m, _ = score_bank_images(
            bank[name], [f[idx] for f in features], cfg, mask_size, batch_images
        )
        maps[idx.numpy()] = m
    return maps, pool(maps, cfg)


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

    Returns the JSON's content plus ``"timing_s"`` (wall seconds of the task-aware scoring and
    of the task-agnostic selection and re-scoring), which stays out of the file so that
    re-runs write identical bytes.
    """
    t = params.task_index(task)
    torch.set_num_threads(params.threads)
    seed_everything(params.seed)
    ckpt = read_checkpoint(model_dir)
    where = str(model_dir / "model.pt")
    sc = params.score
    mask_size, batch = params.data.mask_size, params.eval.batch_images
    is_bank = params.model.kind != "ccnf"
    if is_bank:
        meta = FeatureMeta.load(features_dir)
        bank = ClassBank.from_checkpoint(
            ckpt, expected_kind=params.model.kind,
            expected_spec=model_spec(params, meta.channels, meta.grids),
            device=resolve_device(params.device),
        )
        known = len(bank.classes)
    else:
        model = CCNF.from_checkpoint(ckpt, params.flow).to(resolve_device(params.device))
        model.eval()
        known = model.n_classes
    calibration = {
        cls: calibration_record(rec, sc, mask_size, cls=cls, where=where)
        for cls, rec in ckpt["calibration"].items()
    }
    method = sc.class_select
    last = t == len(params.task_names) - 1
    agnostic = method != "oracle" and (last or params.eval.agnostic_every_task)
    seen_tasks = params.task_names[: t + 1]
    seen = [c for j in range(t + 1) for c in params.split[j]]
    if known < len(seen):
        raise CcnfError(
            f"checkpoint {model_dir} knows {known} classes, task {task} needs {len(seen)}",
            fix="the task split changed since training: dvc repro",
        )
    # global class ids of the seen classes are 0..len(seen)-1 (params.classes is task-ordered)
    candidates = torch.arange(len(seen))
    k, pct = params.eval.threshold_k, params.eval.threshold_percentile
    thr = {
        c: thresholds(calibration[c], sc.alpha, sc.calibrated, k, pct, cls=c, where=where)
        for c in seen
    }
    jobs = [(j, cls) for j in range(t + 1) for cls in params.split[j]]
    per_class: dict[str, Any] = {}
    agn_class: dict[str, Any] = {}
    raw: dict[str, np.ndarray] = {}
    gallery: dict[str, np.ndarray] = {}
    timing = {"aware": 0.0, "selection": 0.0}

    def outputs(
        feats: list[torch.Tensor], names: list[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Image scores and maps of images scored under classes ``names`` (one per image)."""
        if is_bank:
            maps, images = _bank_scores(bank, names, feats, sc, mask_size, batch)
            scores = Scores(nf_map=maps, proto_map=None, nf_image=images, proto_image=None)
        else:
            ids = torch.tensor([params.classes.index(c) for c in names])
            scores = score_images(model, feats, ids, sc, mask_size, batch)
        st = stack_stats(calibration, names)
        return (
            image_scores(scores, st, sc.alpha, sc.calibrated),
            pixel_maps(scores, st, sc.alpha, sc.calibrated),
        )

    for j, cls in track(
        jobs, description=f"evaluate after {task}", console=console, disable=console is None
    ):
        split = load_split(features_dir, cls, "test")
        cid = params.classes.index(cls)
        labels = split.labels.numpy()
        assert split.masks is not None
        masks = split.masks.numpy()
        start = time.perf_counter()
        images, maps = outputs(split.features, [cls] * len(split))
        timing["aware"] += time.perf_counter() - start
        per_class[cls] = {"task": j} | class_metrics(
            labels, masks, images, maps, params.eval.aupro_fpr, _image_thresholds(thr, [cls])
        )
        raw[f"{cls}/labels"] = labels
        for name in images:
            raw[f"{cls}/{name}"] = images[name]
        if agnostic:
            start = time.perf_counter()
            if is_bank:
                stat = -bank.selection_scores(split.features, seen).double().numpy()
                by_method = {"likelihood": np.argmax(stat, axis=1)}
            else:
                stats = class_statistics(model, split.features, candidates, batch,
                                         sc.select_level)
                by_method = {m: stats.select(m) for m in SELECT_METHODS}
            selected = by_method[method]
            names = [seen[i] for i in selected]
            wrong = np.flatnonzero(selected != cid)
            a_images = {s: v.copy() for s, v in images.items()}
            a_maps = {s: v.copy() for s, v in maps.items()}
            if wrong.size:  # right picks keep their task-aware scores: no second pass
                w_images, w_maps = outputs(
                    [f[torch.from_numpy(wrong)] for f in split.features],
                    [names[i] for i in wrong],
                )
                for s in a_images:
                    a_images[s][wrong] = w_images[s]
                    a_maps[s][wrong] = w_maps[s]
            timing["selection"] += time.perf_counter() - start
            picked, counts = np.unique(selected, return_counts=True)
            agn_class[cls] = {
                "task": j,
                "selection_accuracy": _round(np.mean(selected == cid)),
                "selection_accuracy_by_method": {
                    m: _round(np.mean(s_ == cid)) for m, s_ in by_method.items()
                },
                "selected": {seen[int(i)]: int(n) for i, n in zip(picked, counts, strict=True)},
            } | class_metrics(
                labels, masks, a_images, a_maps, params.eval.aupro_fpr,
                _image_thresholds(thr, names),
            )
            raw[f"{cls}/selected"] = selected
            for name in a_images:
                raw[f"{cls}/agnostic/{name}"] = a_images[name]
        defective = np.flatnonzero(labels == 1)[: params.eval.gallery_per_class]
        for kk, i in enumerate(defective):
            gallery[f"{cls}/{kk}/name"] = np.array(split.names[i])
            gallery[f"{cls}/{kk}/mask"] = masks[i]
            for name in maps:
                gallery[f"{cls}/{kk}/{name}"] = maps[name][i]
    result: dict[str, Any] = {
        "task": task,
        "task_index": t,
        "class_select": method,
        "thresholds": {
            "k": k,
            "percentile": pct,
            "per_class": {
                c: {s: {kind: _round(v) for kind, v in by.items()} for s, by in thr[c].items()}
                for c in seen
            },
        },
        "per_class": per_class,
        "per_task": _task_means(per_class, params.split, seen_tasks),
    }
    if method == "oracle":
        result["agnostic"] = {
            "class_select": "oracle", "same_as_aware": True, "selection_accuracy": 1.0
        }
    elif not agnostic:
        result["agnostic"] = {"class_select": method, "same_as_aware": False, "skipped": True}
    else:
        methods = list(agn_class[seen[0]]["selection_accuracy_by_method"])
        result["agnostic"] = {
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
        np.savez_compressed(tmp / "image_scores.npz", **raw)
        np.savez_compressed(tmp / "gallery.npz", **gallery)
    write_json(out_json, result)
    return result | {"timing_s": {k_: round(v, 3) for k_, v in timing.items()}}
