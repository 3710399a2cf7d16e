"""Evaluation after task t: every class of every seen task j <= t, every score, one pass.

Output of :func:`evaluate_task` (``metrics/tasks/<task>.json``)::

    {"task": "t2", "task_index": 2, "class_select": "oracle",
     "per_class": {cls: {"task": j, score: {metric: value}}},
     "per_task":  {"t0": {score: {metric: mean over the task's classes}}, ...}}

plus, in ``eval/<task>/``, the raw image scores (ROC curves) and a few anomaly maps (gallery).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from ccnf.atomic import atomic_path, write_json
from ccnf.config import Params
from ccnf.features import load_split
from ccnf.flows.ccnf import CCNF, read_checkpoint
from ccnf.metrics import aupro, auroc, average_precision, f1_max
from ccnf.scoring import SCORES, image_scores, pixel_maps, score_images
from ccnf.seeding import seed_everything

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1max")
DECIMALS = 6


def class_metrics(
    labels: np.ndarray,
    masks: np.ndarray,
    images: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    fpr_limit: float,
) -> dict[str, dict[str, float]]:
    """Every metric of section 5 for every score of one class's test set.

    labels (N,) 0/1; masks (N, S, S) bool; images[score] (N,); maps[score] (N, S, S).
    """
    out = {}
    for name in SCORES:
        values = {
            "image_auroc": auroc(labels, images[name]),
            "pixel_auroc": auroc(masks, maps[name]),
            "aupro": aupro(masks, maps[name], fpr_limit=fpr_limit),
            "image_ap": average_precision(labels, images[name]),
            "image_f1max": f1_max(labels, images[name])[0],
        }
        # reported to 1e-6: float32 map noise (seen at the 1e-8 level between runs) stays out
        out[name] = {k: round(float(v), DECIMALS) for k, v in values.items()}
    return out


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
    t = params.task_index(task)
    seed_everything(params.seed)
    ckpt = read_checkpoint(model_dir)
    model = CCNF.from_checkpoint(ckpt, params.flow)
    model.eval()
    calibration = ckpt["calibration"]
    seen_tasks = params.task_names[: t + 1]
    jobs = [(j, cls) for j in range(t + 1) for cls in params.split[j]]
    per_class: dict[str, Any] = {}
    raw: dict[str, np.ndarray] = {}
    gallery: dict[str, np.ndarray] = {}
    for j, cls in track(
        jobs, description=f"evaluate after {task}", console=console, disable=console is None
    ):
        split = load_split(features_dir, cls, "test")
        cid = params.classes.index(cls)
        with torch.no_grad():
            scores = score_images(
                model,
                split.features,
                torch.full((len(split),), cid),
                params.score,
                params.data.mask_size,
                params.eval.batch_images,
            )
        labels = split.labels.numpy()
        assert split.masks is not None
        masks = split.masks.numpy()
        images = image_scores(scores, calibration[cls], params.score.alpha)
        maps = pixel_maps(scores, calibration[cls], params.score.alpha)
        per_class[cls] = {"task": j} | class_metrics(
            labels, masks, images, maps, params.eval.aupro_fpr
        )
        raw[f"{cls}/labels"] = labels
        for name in SCORES:
            raw[f"{cls}/{name}"] = images[name]
        defective = np.flatnonzero(labels == 1)[: params.eval.gallery_per_class]
        for k, i in enumerate(defective):
            gallery[f"{cls}/{k}/name"] = np.array(split.names[i])
            gallery[f"{cls}/{k}/mask"] = masks[i]
            for name in SCORES:
                gallery[f"{cls}/{k}/{name}"] = maps[name][i]
    per_task = {}
    for j, tname in enumerate(seen_tasks):
        classes = params.split[j]
        per_task[tname] = {
            name: {
                m: round(float(np.mean([per_class[c][name][m] for c in classes])), DECIMALS)
                for m in METRICS
            }
            for name in SCORES
        }
    result = {
        "task": task,
        "task_index": t,
        "class_select": params.score.class_select,
        "per_class": per_class,
        "per_task": per_task,
    }
    with atomic_path(eval_dir) as tmp:
        tmp.mkdir(parents=True)
        np.savez_compressed(tmp / "image_scores.npz", **raw)
        np.savez_compressed(tmp / "gallery.npz", **gallery)
    write_json(out_json, result)
    return result
