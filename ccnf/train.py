"""Training of one task, for any model kind: resume, learn the task's classes, calibrate, save.

Continual protocol: task t sees only its own classes' cached training features (minus a
held-out calibration slice); the model carries everything else. The calibration patch scores
of task t's classes are measured right after task t with the model of that moment and stored
in the checkpoint, so no earlier task's data is ever touched again. What a model does to learn
is its own (:mod:`ccnf.models`); this module never asks which kind it holds.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ccnf.atomic import atomic_path
from ccnf.config import Params
from ccnf.device import resolve_device
from ccnf.errors import CcnfError
from ccnf.features import FeatureMeta, FeatureSplit, load_inputs
from ccnf.models import AnomalyModel, TaskInputs, create_model, read_checkpoint, restore_model
from ccnf.models.base import SNAPSHOTS
from ccnf.seeding import seed_everything, stream_seed
from ccnf.store import save_artifact


def calibration_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (fit, calib) index split of n training images; both non-empty."""
    if n < 2:
        raise CcnfError(f"need at least 2 training images per class, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_calib = min(n - 1, max(1, round(fraction * n)))
    return perm[n_calib:].sort().values, perm[:n_calib].sort().values


def task_classes(params: Params, t: int) -> tuple[list[str], int]:
    """(classes task t adds, how many classes precede them). joint: every class at task 0."""
    if params.train.strategy == "joint":
        return (list(params.classes), 0) if t == 0 else ([], len(params.classes))
    offset = sum(len(c) for c in params.split[:t])
    return list(params.split[t]), offset


def write_log(path: Path, rows: list[dict[str, float]], leading: Sequence[str]) -> None:
    """One row per optimizer step; columns: ``leading`` then any other keys of the rows."""
    columns = list(leading)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", restval="")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def write_checkpoint(
    out_dir: Path, model: AnomalyModel, task: int, calibration: dict[str, Any],
    rows: list[dict[str, float]] | None, snapshots: dict[str, dict[str, Any]] | None = None,
) -> None:
    """``out_dir``/model.pt, (unless rows is None) train_log.tsv and (``eval.test_selected``)
    ``snapshots/<name>/model.pt``, atomically (all or nothing)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_artifact(tmp / "model.pt", model.checkpoint(task=task, calibration=calibration),
                      kind="checkpoint")
        if rows is not None:
            write_log(tmp / "train_log.tsv", rows, model.log_columns)
        for name, ckpt in (snapshots or {}).items():
            (tmp / SNAPSHOTS / name).mkdir(parents=True)
            save_artifact(tmp / SNAPSHOTS / name / "model.pt", ckpt, kind="checkpoint")


def snapshot_steps(total: int, n: int) -> set[int]:
    """The step counts after which ``eval.test_selected = n`` keeps a snapshot: n - 1 evenly
    spaced ones before the final model (which is evaluated anyway)."""
    return {round(k * total / n) for k in range(1, n)} - {0, total}


def calibrate(model: AnomalyModel, calib: dict[str, FeatureSplit], batch_images: int
              ) -> dict[str, Any]:
    """{class: the model's patch scores of its calibration images}, for the checkpoint."""
    return {cls: model.patch_scores(split.features, [cls] * len(split), batch_images).to_record()
            for cls, split in calib.items()}


class _Snapshots:
    """The model's state after chosen steps of a task (``eval.test_selected``), each turned
    into a checkpoint with its own calibration for the task's classes."""

    def __init__(self, model: AnomalyModel, n: int) -> None:
        self.model, self.n = model, n
        self.states: dict[str, dict[str, Any]] = {}
        self._steps: tuple[int, set[int]] = (-1, set())  # (total, its snapshot steps)

    def __call__(self, done: int, total: int) -> None:
        if self._steps[0] != total:
            self._steps = (total, snapshot_steps(total, self.n))
        if done in self._steps[1]:
            self.states[f"step_{done:06d}"] = copy.deepcopy(self.model.state())

    def checkpoints(
        self, params: Params, meta: FeatureMeta, t: int, classes: list[str],
        calibration: dict[str, Any], calib: dict[str, FeatureSplit],
    ) -> dict[str, dict[str, Any]]:
        out = {}
        for name, state in self.states.items():
            ckpt = self.model.checkpoint_of(state, classes=classes, task=t, calibration={})
            snap = restore_model(ckpt, params, meta, resolve_device(params.device),
                                 where=f"snapshot {name}")
            ckpt["calibration"] = dict(calibration) | calibrate(snap, calib,
                                                                params.eval.batch_images)
            out[name] = ckpt
        return out


def train_task(
    params: Params,
    task: str,
    features_dir: Path,
    prev_dir: Path,
    out_dir: Path,
    *,
    console: Console | None = None,
) -> dict[str, float]:
    """Train ``task`` from ``prev_dir``'s checkpoint; write ``out_dir`` atomically.

    out_dir holds model.pt (the model, its seen classes and their calibration patch scores)
    and train_log.tsv (one row per optimizer step). With ``train.strategy: joint`` task 0
    learns every class and later tasks write the same model under their own name.
    """
    t = params.task_index(task)
    torch.set_num_threads(params.threads)
    seed_everything(stream_seed(params.seed, "task", t))
    ckpt = read_checkpoint(prev_dir)
    meta = FeatureMeta.load(features_dir)
    where = str(Path(prev_dir) / "model.pt")
    model = restore_model(ckpt, params, meta, resolve_device(params.device), where=where)
    new, offset = task_classes(params, t)
    expected = params.classes[:offset]
    if model.classes != expected:
        raise CcnfError(
            f"checkpoint {prev_dir} holds classes {model.classes} but task {task} expects "
            f"{expected} before it",
            fix="the task split or train.strategy changed: dvc repro re-runs the chain",
        )
    k = params.features.neighbourhood
    fit: dict[str, FeatureSplit] = {}
    calib: dict[str, FeatureSplit] = {}
    fit_indices: dict[str, list[int]] = {}
    for cls in new:
        split = load_inputs(features_dir, cls, "train", k)
        fit_idx, calib_idx = calibration_split(len(split), params.eval.calib_fraction, params.seed)
        fit[cls], calib[cls] = split.subset(fit_idx), split.subset(calib_idx)
        fit_indices[cls] = fit_idx.tolist()
    snapshots = _Snapshots(model, params.eval.test_selected)
    inputs = TaskInputs(
        task=t, name=task, classes=fit, fit_indices=fit_indices,
        load=lambda cls, idx: load_inputs(features_dir, cls, "train", k).subset(idx),
        after_step=snapshots if params.eval.test_selected > 1 else None,
    )
    start = time.perf_counter()
    rows = model.learn_task(inputs, params, console=console) if new else []
    seconds = time.perf_counter() - start
    kept = snapshots.checkpoints(params, meta, t, expected + new, ckpt["calibration"], calib)
    calibration = dict(ckpt["calibration"]) | calibrate(model, calib, params.eval.batch_images)
    write_checkpoint(out_dir, model, t, calibration, rows, kept)
    return {
        "steps": float(len(rows)),
        "seconds": seconds if new else 0.0,
        "final_loss": rows[-1].get("loss", float("nan")) if rows else float("nan"),
    }


def init_model(params: Params, features_dir: Path, out_dir: Path) -> None:
    """The seeded, class-less model that task 0 starts from (models/init)."""
    meta = FeatureMeta.load(features_dir)
    torch.set_num_threads(params.threads)
    seed_everything(params.seed)
    write_checkpoint(out_dir, create_model(params, meta), -1, {}, None)
