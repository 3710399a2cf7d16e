"""CCNF behind the model contract: the training glue of one shared conditional flow.

The torch modules live in :mod:`ccnf.flows` (:class:`ccnf.flows.ccnf.CCNF`), the loss terms in
:mod:`ccnf.losses`, the patch scores and selection statistics in :mod:`ccnf.models.ccnf_scores`;
this module learns a task with them. Continual protocol: task t sees only its own classes'
fit features (and, with ``train.strategy: replay``, the stored images of its replay buffer);
the shared flow carries everything else. Strategies: naive fine-tuning, ``freeze_after_first``
(E6), ``replay`` and ``joint`` (every class at task 0), with E5's partial freezing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn

from ccnf.config import FlowConfig, Params, TrainConfig
from ccnf.errors import NonFiniteLossError
from ccnf.features import FeatureSplit
from ccnf.flows.ccnf import CCNF, CCNFSpec
from ccnf.losses import TERMS, LevelBatch, build_heads, level_losses, total_loss
from ccnf.models.base import AnomalyModel, TaskInputs
from ccnf.models.ccnf_scores import class_statistics, patch_scores
from ccnf.optim import AdamW
from ccnf.patch_scores import PatchScores
from ccnf.patches import gather_patches, sample_positions
from ccnf.schedule import StepBudget, lr_factor
from ccnf.seeding import stream_seed

if TYPE_CHECKING:
    from ccnf.features import FeatureMeta


def ccnf_spec(cfg: FlowConfig, channels: list[int]) -> CCNFSpec:
    """The CCNF hyper-parameters of params.yaml's ``flow`` section for levels of ``channels``
    (per-level couplings and subnet widths resolved here)."""
    n = len(channels)
    return CCNFSpec(
        n_couplings=tuple(cfg.couplings_at(lvl, n) for lvl in range(n)),
        hidden_dims=tuple(cfg.hidden_at(lvl, n, int(d)) for lvl, d in enumerate(channels)),
        embedding_dim=cfg.embedding_dim, pos_dim=cfg.pos_dim, noise_dim=cfg.noise_dim,
        conditioning=cfg.conditioning, class_conditioning=cfg.class_conditioning,
        class_norm=cfg.class_norm, class_actnorm=cfg.class_actnorm,
        feature_norm=cfg.feature_norm, prior=cfg.prior, prototypes=cfg.prototypes,
        clamp_alpha=cfg.clamp_alpha, spectral_norm=cfg.spectral_norm,
        warmup_steps=cfg.warmup_steps,
    )


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
    b = images.numel()
    pos = sample_positions(b, feats.shape[1], k, gen)
    kk = pos.shape[1]
    images, pos = images.to(device), pos.to(device)
    x = gather_patches(feats, images, pos)
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


class CCNFModel(AnomalyModel):
    """One class-conditioned flow shared by every class (``model.kind: ccnf``)."""

    kind = "ccnf"
    map_scores = ("nf", "latent", "proto")
    select_methods = ("likelihood", "prototype")
    strategies = ("naive", "freeze_after_first", "replay", "joint")
    log_columns = ("step", "task", "epoch", "loss", *TERMS)

    def __init__(
        self, net: CCNF, classes: list[str], device: torch.device,
        replay: dict[str, list[int]] | None = None,
    ) -> None:
        self.net = net
        self._classes = list(classes)
        self.device = device
        # train.strategy replay: {class: train-split indices of the images kept}
        self.replay: dict[str, list[int]] = dict(replay or {})

    @classmethod
    def create(cls, params: Params, meta: FeatureMeta) -> CCNFModel:
        net = CCNF(meta.channels, meta.grids, ccnf_spec(params.flow, meta.channels))
        return cls(net, [], torch.device("cpu"))

    @classmethod
    def restore(
        cls, ckpt: dict[str, Any], params: Params, meta: FeatureMeta | None,
        device: torch.device,
    ) -> CCNFModel:
        # the module stays on the CPU until it is used: new classes' rows are added there
        spec = ccnf_spec(params.flow, ckpt["channels"])
        return cls(CCNF.from_checkpoint(ckpt, spec), ckpt["classes"], device,
                   ckpt.get("replay", {}))

    def state(self) -> dict[str, Any]:
        return {**self.net.checkpoint(), "replay": self.replay}

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def _ready(self) -> CCNF:
        return self.net.to(self.device).eval()

    # -- scoring -----------------------------------------------------------------------------
    def patch_scores(
        self, features: list[torch.Tensor], classes: list[str], batch_images: int
    ) -> PatchScores:
        ids = torch.tensor([self._classes.index(c) for c in classes])
        return patch_scores(self._ready(), features, ids, batch_images)

    def select(
        self,
        features: list[torch.Tensor],
        candidates: list[str],
        batch_images: int,
        level: int | None,
    ) -> dict[str, np.ndarray]:
        ids = torch.tensor([self._classes.index(c) for c in candidates])
        stats = class_statistics(self._ready(), features, ids, batch_images, level)
        return {m: np.argmax(stats.statistic(m), axis=1) for m in self.select_methods}

    # -- learning ----------------------------------------------------------------------------
    def learn_task(
        self, inputs: TaskInputs, params: Params, *, console: Console | None = None
    ) -> list[dict[str, float]]:
        """Add the task's classes and train the shared flow on them (``train.*``, ``loss.*``).

        Randomness: the new classes' initial rows and any loss head come from the global RNG
        (seeded by the train stage), image order, positions and loss samples from a CPU
        generator seeded by :func:`ccnf.seeding.stream_seed` (``batches``).
        """
        t, task = inputs.task, inputs.name
        model = self.net
        offset = len(self._classes)
        names = list(inputs.classes)
        model.add_classes(len(names))
        _switch_spectral_norm(model, params, t)
        class_ids = list(range(offset, offset + len(names)))
        fit = dict(zip(class_ids, inputs.classes.values(), strict=True))
        replay = self.replay if params.train.strategy == "replay" else {}
        replayed = {
            params.classes.index(cls): inputs.load(cls, idx) for cls, idx in replay.items() if idx
        }
        if params.flow.class_norm:
            _set_class_stats(model, fit)
        device = self.device
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
        schedule = Schedule.for_task(params, t, n_img, len(names))
        gen = torch.Generator().manual_seed(stream_seed(params.seed, "batches", t))
        seen = torch.arange(offset + len(names), device=device)
        # L_mi / L_e candidates: the classes whose data this task trains on (its own and any
        # replayed ones), or every seen class (loss.negatives)
        negatives = seen if params.loss.negatives == "seen" else data.labels.unique()
        per_epoch, steps = schedule.budget.steps_per_epoch, schedule.budget.steps
        rows: list[dict[str, float]] = []
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
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(f"non-finite weights after task {task}; nothing written")
        if params.flow.prototypes == "fixed":
            model.freeze_prototypes(class_ids)
        self._classes += names
        if params.train.strategy == "replay":
            new_fit = {cls: inputs.fit_indices[cls] for cls in names}
            self.replay = update_replay_buffer(
                replay, new_fit, params.train.replay_buffer,
                stream_seed(params.seed, "replay", t),
            )
        else:
            self.replay = {}
        return rows
