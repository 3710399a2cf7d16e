"""Training of one task: resume from the previous checkpoint, learn the task's classes.

Continual protocol: task t sees only its own classes' cached training features (minus a
held-out calibration slice); the model carries everything else. The calibration statistics of
task t's classes are measured right after task t with the model of that moment and stored in
the checkpoint, so no earlier task's data is ever touched again.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    track,
)
from torch import nn

from ccnf.atomic import atomic_path
from ccnf.baselines import ClassBank, bank_patch_scores, class_seed, model_spec
from ccnf.config import Params, TrainConfig
from ccnf.device import resolve_device
from ccnf.errors import CcnfError, NonFiniteLossError
from ccnf.features import FeatureMeta, FeatureSplit, load_inputs
from ccnf.flows.ccnf import CCNF, read_checkpoint
from ccnf.losses import TERMS, LevelBatch, build_heads, level_losses, total_loss
from ccnf.optim import AdamW
from ccnf.schedule import StepBudget, lr_factor
from ccnf.scoring import calibration_patches
from ccnf.seeding import seed_everything
from ccnf.store import save_artifact

LOG_COLUMNS = ("step", "task", "epoch", "loss", *TERMS)


def calibration_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (fit, calib) index split of n training images; both non-empty."""
    if n < 2:
        raise CcnfError(f"need at least 2 training images per class, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_calib = min(n - 1, max(1, round(fraction * n)))
    return perm[n_calib:].sort().values, perm[:n_calib].sort().values


def update_replay_buffer(
    buffer: dict[str, list[int]], new: dict[str, list[int]], capacity: int, seed: int
) -> dict[str, list[int]]:
    """Class-balanced replay buffer after a task: at most ``capacity`` images in all.

    buffer: {class: train-split indices kept so far}; new: {class: fit indices of the task just
    learned}. Every seen class keeps capacity // n_classes images: earlier classes drop from the
    end of their list, new classes draw a seeded random sample of their fit images (never the
    calibration slice).
    """
    classes = [*buffer, *new]
    quota = capacity // len(classes)
    out = {cls: list(idx[:quota]) for cls, idx in buffer.items()}
    gen = torch.Generator().manual_seed(seed)
    for cls, idx in new.items():
        pick = torch.randperm(len(idx), generator=gen)[:quota].tolist()
        out[cls] = [idx[i] for i in pick]
    return out


@dataclass
class TaskData:
    """A task's training images: feats[l] (N, H_l*W_l, D_l) float32, labels (N,) class ids."""

    feats: list[torch.Tensor]
    labels: torch.Tensor


def _stack_task(splits: dict[int, FeatureSplit]) -> TaskData:
    feats = []
    for lvl in range(len(next(iter(splits.values())).features)):
        per_class = [s.features[lvl].float().flatten(2).transpose(1, 2) for s in splits.values()]
        feats.append(torch.cat(per_class).contiguous())
    labels = torch.cat([torch.full((len(s),), cid, dtype=torch.long) for cid, s in splits.items()])
    return TaskData(feats, labels)


def _sample_batch(
    data: TaskData, images: torch.Tensor, level: int, k: int | None, gen: torch.Generator
) -> LevelBatch:
    """Random positions are drawn on the CPU generator (same draws on every device)."""
    feats = data.feats[level]
    device = feats.device
    b, hw = images.numel(), feats.shape[1]
    if k is None or k >= hw:
        pos = torch.arange(hw).expand(b, hw)
    else:
        pos = torch.rand(b, hw, generator=gen).argsort(dim=1)[:, :k]
    kk = pos.shape[1]
    images, pos = images.to(device), pos.to(device)
    x = feats[images[:, None], pos].reshape(b * kk, -1)
    image_class = data.labels[images]
    return LevelBatch(
        x=x,
        y=image_class.repeat_interleave(kk),
        pos=pos.reshape(-1),
        image=torch.arange(b, device=device).repeat_interleave(kk),
        image_class=image_class,
    )


def _check_finite(terms: dict[str, torch.Tensor], task: str, step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite loss term {name} = {value.item()} at task {task}, step {step}; "
                "no checkpoint was written",
                where=f"train stage of task {task}",
                fix="lower train.lr, enable flow.spectral_norm, lower flow.clamp_alpha or "
                "raise train.grad_clip strictness",
            )


def _task_classes(params: Params, t: int) -> tuple[list[str], int]:
    """(classes this task's training adds, global id of the first). joint: all at task 0."""
    if params.train.strategy == "joint":
        return (list(params.classes), 0) if t == 0 else ([], len(params.classes))
    offset = sum(len(c) for c in params.split[:t])
    return list(params.split[t]), offset


def _set_feature_stats(model: CCNF, data: TaskData) -> None:
    """E1: per-channel mean/std of the task's fit features, fixed for the rest of the study."""
    for lvl, feats in enumerate(data.feats):
        flat = feats.reshape(-1, feats.shape[-1])
        model.set_feature_stats(lvl, flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6))


def _freeze(model: CCNF, params: Params, t: int) -> list[nn.Module]:
    """Apply the strategy's freezing for task t (E6 whole flows, E5 leading couplings).

    Returns the frozen modules; training keeps them in eval mode, so frozen means frozen:
    not even the spectral norm's power iteration touches them.
    """
    tc = params.train
    frozen: list[nn.Module] = []
    if tc.strategy == "freeze_after_first" and t > 0:
        frozen = [model.flows]
    elif tc.partial_freeze > 0 and t > 0:
        frozen = [flow.couplings[: tc.partial_freeze] for flow in model.flows]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


@dataclass
class Schedule:
    """Training schedule of one task: ``rounds`` rounds (E3 metaE) of ``budget.steps`` optimizer
    steps (:class:`ccnf.schedule.StepBudget`), regularizers only in the first ``reg_epochs``
    epochs of a round (E3 subE) and scaled by ``reg_scale`` (E2/E3); the learning rate follows
    ``train.lr_schedule`` within each round (:func:`ccnf.schedule.lr_factor`) and, with
    several rounds, is re-warmed linearly over the first epoch of each round (``rewarm``)."""

    rounds: int
    budget: StepBudget
    reg_scale: float
    reg_epochs: int | None
    rewarm: bool

    @staticmethod
    def for_task(params: Params, t: int, n_images: int, n_classes: int) -> Schedule:
        tc = params.train
        first = t == 0
        return Schedule(
            rounds=tc.meta_epochs if first else 1,
            budget=StepBudget.of(n_images, n_classes, tc),
            reg_scale=tc.first_task_reg_scale if first else 1.0,
            reg_epochs=tc.sub_epochs,
            rewarm=first and tc.meta_epochs > 1,
        )

    @property
    def total_steps(self) -> int:
        return self.rounds * self.budget.steps

    def reg_factor(self, step: int) -> float:
        """Regularizer weight factor at step ``step`` of a round."""
        if self.reg_epochs is not None and self.budget.epoch_of(step) >= self.reg_epochs:
            return 0.0
        return self.reg_scale

    def lr_factor(self, step: int, train: TrainConfig) -> float:
        """Learning-rate factor at step ``step`` of a round."""
        factor = lr_factor(step, self.budget.steps, train)
        if self.rewarm and step < self.budget.steps_per_epoch:
            factor *= (step + 1) / self.budget.steps_per_epoch
        return factor


def _write_checkpoint(
    out_dir: Path, model: CCNF, rows: list[dict[str, float]], **extra: object
) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_artifact(tmp / "model.pt", model.checkpoint(**extra), kind="checkpoint")
        _write_log(tmp / "train_log.tsv", rows)


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    """One row per optimizer step; columns: LOG_COLUMNS then any extra keys of the rows."""
    columns = list(LOG_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", restval="")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def _set_class_stats(model: CCNF, fit: dict[int, FeatureSplit]) -> None:
    """flow.class_norm: each new class's per-channel mean/std over all its fit patches."""
    for cid, split in fit.items():
        for lvl, f in enumerate(split.features):
            flat = f.float().flatten(2).transpose(1, 2).reshape(-1, f.shape[1])
            model.set_class_stats(lvl, cid, flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6))


def _switch_spectral_norm(model: CCNF, params: Params, t: int) -> None:
    """Spectral norm on or off for task t (``flow.spectral_norm``, ``..._first_task``); the
    switch on at task 1 absorbs the current norms or lets the weights jump
    (``flow.spectral_norm_switch``)."""
    fc = params.flow
    on = fc.spectral_norm and (t > 0 or fc.spectral_norm_first_task)
    model.set_spectral_norm(on, absorb=fc.spectral_norm_switch == "absorb")


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

    out_dir holds model.pt (weights + seen classes + calibration patch scores) and
    train_log.tsv (one row per step: every loss term). With ``train.strategy: joint`` task 0
    learns every class and later tasks write the same weights under their own name.
    """
    t = params.task_index(task)
    torch.set_num_threads(params.threads)
    seed_everything(params.seed * 1009 + t)
    ckpt = read_checkpoint(prev_dir)
    if params.model.kind != "ccnf":
        return train_bank_task(params, task, features_dir, ckpt, out_dir, console=console)
    task_classes, offset = _task_classes(params, t)
    expected = params.classes[:offset]
    if ckpt.get("classes", []) != expected:
        raise CcnfError(
            f"checkpoint {prev_dir} holds classes {ckpt.get('classes')} but task {task} "
            f"expects {expected} before it",
            fix="the task split or train.strategy changed: dvc repro re-runs the chain",
        )
    model = CCNF.from_checkpoint(ckpt, params.flow)
    device = resolve_device(params.device)
    if not task_classes:  # joint, after task 0: nothing new to learn
        _write_checkpoint(
            out_dir,
            model,
            [],
            classes=expected,
            task=t,
            calibration=ckpt["calibration"],
            replay={},
        )
        return {"steps": 0.0, "seconds": 0.0, "final_loss": float("nan")}
    model.add_classes(len(task_classes))
    _switch_spectral_norm(model, params, t)
    class_ids = list(range(offset, offset + len(task_classes)))

    k = params.features.neighbourhood
    fit: dict[int, FeatureSplit] = {}
    calib: dict[int, FeatureSplit] = {}
    fit_indices: dict[int, list[int]] = {}
    for cid, cls in zip(class_ids, task_classes, strict=True):
        split = load_inputs(features_dir, cls, "train", k)
        fit_idx, calib_idx = calibration_split(len(split), params.eval.calib_fraction, params.seed)
        fit[cid], calib[cid] = split.subset(fit_idx), split.subset(calib_idx)
        fit_indices[cid] = fit_idx.tolist()
    replay = ckpt.get("replay", {}) if params.train.strategy == "replay" else {}
    replayed = {
        params.classes.index(cls): load_inputs(features_dir, cls, "train", k).subset(idx)
        for cls, idx in replay.items()
        if idx
    }
    if params.flow.class_norm:
        _set_class_stats(model, fit)
    model.to(device)
    data = _stack_task({**fit, **replayed})
    data = TaskData([f.to(device) for f in data.feats], data.labels.to(device))
    if params.flow.feature_norm and t == 0:
        _set_feature_stats(model, data)

    tc = params.train
    build_heads(model, params.loss)
    frozen = _freeze(model, params, t)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    n_img = data.labels.numel()
    schedule = Schedule.for_task(params, t, n_img, len(task_classes))
    gen = torch.Generator().manual_seed(params.seed * 7919 + t)
    seen = torch.arange(offset + len(task_classes), device=device)
    # L_mi / L_e candidates: the classes whose data this task trains on (its own and any
    # replayed ones), or every seen class (loss.negatives)
    negatives = seen if params.loss.negatives == "seen" else data.labels.unique()
    per_epoch, steps = schedule.budget.steps_per_epoch, schedule.budget.steps
    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    progress = Progress(
        TextColumn(f"[bold]train {task}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        bar = progress.add_task("train", total=schedule.total_steps, loss="-")
        model.train()
        for module in frozen:
            module.eval()
        order = torch.empty(0, dtype=torch.long)
        for _ in range(schedule.rounds):
            for i in range(steps):
                at = i % per_epoch
                if at == 0:
                    order = torch.randperm(n_img, generator=gen)
                for group in optimizer.param_groups:
                    group["lr"] = tc.lr * schedule.lr_factor(i, tc)
                images = order[at * tc.images_per_step : (at + 1) * tc.images_per_step]
                per_level = [
                    level_losses(
                        model,
                        lvl,
                        _sample_batch(data, images, lvl, tc.patches_per_image, gen),
                        seen,
                        params.loss,
                        gen,
                        negatives=negatives,
                    )
                    for lvl in range(model.n_levels)
                ]
                loss, means = total_loss(per_level, params.loss, schedule.reg_factor(i))
                step = int(model.global_step)
                _check_finite({"loss": loss, **means}, task, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
                    _check_finite({"grad_norm": norm}, task, step)
                optimizer.step()
                model.global_step += 1
                rows.append(
                    {"step": step, "task": t, "epoch": schedule.budget.epoch_of(i),
                     "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
                    | {k_: v.item() for k_, v in means.items()}
                )
                progress.update(bar, advance=1, loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteLossError(f"non-finite weights after task {task}; nothing written")
    if params.flow.prototypes == "fixed":
        model.freeze_prototypes(class_ids)

    calibration = {
        cls: calibration_patches(model, calib[cid].features, cid, params.eval.batch_images)
        for cid, cls in zip(class_ids, task_classes, strict=True)
    }
    all_calibration = {**ckpt.get("calibration", {}), **calibration}
    seen_classes = params.classes[: offset + len(task_classes)]
    buffer: dict[str, list[int]] = {}
    if params.train.strategy == "replay":
        new_fit = {cls: fit_indices[cid] for cid, cls in zip(class_ids, task_classes, strict=True)}
        buffer = update_replay_buffer(
            replay, new_fit, params.train.replay_buffer, params.seed * 104729 + t
        )
    _write_checkpoint(
        out_dir,
        model,
        rows,
        classes=seen_classes,
        task=t,
        calibration=all_calibration,
        replay=buffer,
    )
    return {
        "steps": float(len(rows)),
        "seconds": train_seconds,
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
    }


def train_bank_task(
    params: Params,
    task: str,
    features_dir: Path,
    ckpt: dict,
    out_dir: Path,
    *,
    console: Console | None = None,
) -> dict[str, float]:
    """A per-class baseline (``model.kind`` != ccnf): fit one new model per class of the task.

    The models of earlier classes are loaded and saved untouched. Each class is fitted on its
    fit slice and calibrated on its held-out slice, like CCNF; the strategy does not apply
    (a bank cannot forget).
    """
    t = params.task_index(task)
    meta = FeatureMeta.load(features_dir)
    bank = ClassBank.from_checkpoint(
        ckpt,
        expected_kind=params.model.kind,
        expected_spec=model_spec(params, meta.channels, meta.grids),
        device=resolve_device(params.device),
    )
    offset = sum(len(c) for c in params.split[:t])
    if bank.classes != params.classes[:offset]:
        raise CcnfError(
            f"checkpoint holds classes {bank.classes} but task {task} expects "
            f"{params.classes[:offset]} before it",
            fix="the task split changed: dvc repro re-runs the chain",
        )
    rows: list[dict[str, float]] = []
    calibration = dict(ckpt.get("calibration", {}))
    start = time.perf_counter()
    for cls in track(
        params.split[t], description=f"train {task} ({params.model.kind})", console=console,
        disable=console is None,
    ):
        split = load_inputs(features_dir, cls, "train", params.features.neighbourhood)
        fit_idx, calib_idx = calibration_split(len(split), params.eval.calib_fraction, params.seed)
        cid = params.classes.index(cls)
        log = bank.add_class(
            cls, split.subset(fit_idx).features, params.train, class_seed(params.seed, cid)
        )
        # the bank's optimizer steps already stop on a non-finite loss or gradient norm
        rows += [{"step": len(rows) + i, "task": t, **row} for i, row in enumerate(log)]
        calibration[cls] = bank_patch_scores(
            bank[cls], split.subset(calib_idx).features, params.eval.batch_images
        ).to_record()
    seconds = time.perf_counter() - start
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_artifact(
            tmp / "model.pt",
            bank.checkpoint(task=t, calibration=calibration, n_parameters=bank.n_parameters()),
            kind="checkpoint",
        )
        _write_log(tmp / "train_log.tsv", rows)
    return {
        "steps": float(len(rows)),
        "seconds": seconds,
        "final_loss": rows[-1].get("loss", float("nan")) if rows else float("nan"),
    }


def init_model(params: Params, features_dir: Path, out_dir: Path) -> None:
    """The seeded, class-less model that task 0 starts from (models/init)."""
    meta = FeatureMeta.load(features_dir)
    torch.set_num_threads(params.threads)
    seed_everything(params.seed)
    if params.model.kind != "ccnf":
        bank = ClassBank.from_params(params, meta.channels, meta.grids)
        ckpt = bank.checkpoint(task=-1, calibration={})
    else:
        model = CCNF(meta.channels, meta.grids, params.flow, n_classes=0)
        ckpt = model.checkpoint(classes=[], task=-1, calibration={})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_artifact(tmp / "model.pt", ckpt, kind="checkpoint")
