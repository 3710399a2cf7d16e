"""CCNF behind the model contract: the training glue of one shared conditional flow.

The torch modules live in :mod:`ccnf.flows` (:class:`ccnf.flows.ccnf.CCNF`), the loss terms in
:mod:`ccnf.losses`, the patch scores and selection statistics in :mod:`ccnf.models.ccnf_scores`;
this module learns a task with them. Continual protocol: task t sees only its own classes'
fit features (and, with ``train.strategy: replay``, the stored images of its replay buffer);
the shared flow carries everything else. Strategies: naive fine-tuning, ``freeze_after_first``
(E6), ``replay`` and ``joint`` (every class at task 0), with E5's partial freezing;
``adapters`` (the flow frozen after task 0, a low-rank adapter per later task: parameter
isolation, so earlier classes' densities cannot change) and ``generative_replay`` (before task
t the model generates features of every earlier class by inverting the flow; they are trained on
with the task's data and never stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
        class_norm=cfg.class_norm, class_norm_mean=cfg.class_norm_mean,
        class_mean_rank=cfg.class_mean_rank, class_mean_bits=cfg.class_mean_bits,
        class_mean_quantizer=cfg.class_mean_quantizer,
        class_actnorm=cfg.class_actnorm,
        mean_condition_dim=cfg.mean_condition_dim,
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
    """A task's training images: feats[l] (N, H_l*W_l, D_l) float32, labels (N,) class ids;
    target[l] (N, H_l*W_l, T): what L_distill matches on generated images' vectors (T = 1: the
    generating model's log p; T = D_l: the latent z the vector was generated from; NaN rows for
    real images), or None when nothing was generated or nothing is distilled."""

    feats: list[torch.Tensor]
    labels: torch.Tensor
    target: list[torch.Tensor] | None = None

    def to(self, device: torch.device) -> TaskData:
        targets = self.target
        return TaskData([f.to(device) for f in self.feats], self.labels.to(device),
                        None if targets is None else [t.to(device) for t in targets])

    def __add__(self, other: TaskData) -> TaskData:
        """Both sets of images (self's first); real images get NaN targets."""
        width = [t.shape[-1] for t in (self.target or other.target or [])]

        def targets(d: TaskData) -> list[torch.Tensor]:
            if d.target is not None:
                return d.target
            return [f.new_full((*f.shape[:2], w), float("nan"))
                    for f, w in zip(d.feats, width, strict=True)]

        have = self.target is not None or other.target is not None
        return TaskData(
            [torch.cat(pair) for pair in zip(self.feats, other.feats, strict=True)],
            torch.cat([self.labels, other.labels]),
            [torch.cat(pair) for pair in zip(targets(self), targets(other), strict=True)]
            if have else None,
        )


#: vectors per flow pass when generating (bounds the memory of the inverse pass)
GENERATION_CHUNK = 65536


@torch.no_grad()
def generate_task_data(
    model: CCNF, class_ids: list[int], per_class: int, tau: float, gen: torch.Generator,
    *, targets: Literal["log_prob", "latent"] | None = "log_prob",
) -> TaskData:
    """Generated feature maps of ``class_ids`` (``per_class`` each) from the model as it is.

    Per level l and generated image: z ~ N(mu_y, tau^2 I) at every grid position (mu_y = 0
    under the standard prior), x~ = f_l^{-1}(z; y, position) in raw feature units, and the
    target L_distill matches (``loss.distill_target``): ``log_prob``, the model's own
    log p(x~ | y) (one more flow pass); ``latent``, z itself; None: no target.
    Latents are drawn on the CPU generator ``gen`` (same values on every device).
    """
    was_training = model.training
    model.eval()
    device = model.embedding.device
    labels = torch.as_tensor(class_ids, dtype=torch.long).repeat_interleave(per_class)
    n = labels.numel()
    feats, targets_all = [], []
    for lvl in range(model.n_levels):
        hw, dim = model.positions(lvl).shape[0], model.channels[lvl]
        y = labels.repeat_interleave(hw).to(device)
        pos = torch.arange(hw).repeat(n).to(device)
        z = (torch.randn(n * hw, dim, generator=gen) * tau).to(device)
        xs, level_targets = [], []
        for start in range(0, n * hw, GENERATION_CHUNK):
            sl = slice(start, start + GENERATION_CHUNK)
            zc = z[sl]
            if model.cfg.prior == "class_mixture":
                zc = zc + model.prototype(lvl, y[sl])
            x = model.inverse_level(lvl, zc, y[sl], pos[sl])
            xs.append(x)
            if targets == "log_prob":
                level_targets.append(model.forward_level(lvl, x, y[sl], pos[sl]).log_prob[:, None])
            elif targets == "latent":
                level_targets.append(zc)
        x_all = torch.cat(xs)
        if not torch.isfinite(x_all).all():
            raise NonFiniteLossError(
                f"generated features of level {lvl} are not finite",
                where="train.strategy generative_replay",
                fix="lower train.generation_tau (or flow.clamp_alpha)",
            )
        feats.append(x_all.reshape(n, hw, dim))
        if targets is not None:
            targets_all.append(torch.cat(level_targets).reshape(n, hw, -1))
    model.train(was_training)
    return TaskData(feats, labels.to(device), targets_all if targets is not None else None)


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
    target = None
    if data.target is not None:
        target = gather_patches(data.target[level], images, pos)
    return LevelBatch(
        x=x,
        y=image_class.repeat_interleave(kk),
        pos=pos.reshape(-1),
        image=torch.arange(b, device=device).repeat_interleave(kk),
        image_class=image_class,
        target=target,
    )


class _BatchDraw:
    """Which images each optimizer step trains on.

    The task's images are indexed [0, n_real) real (its own and any replay buffer's), then
    [n_real, n_total) generated (generative replay). By default they are one pool: each epoch is
    a permutation of all n_total, cut into steps of ``train.images_per_step`` images. With
    ``train.generated_per_step`` = G and generated images present, the real images keep the
    epochs and the step budget of a task without replay, and every step adds G generated images
    from their own permutation (renewed each time it is used up), so the new classes get as
    many steps as under naive training. ``train.generated_per_step_per_class`` = k raises G to
    max(G, k x ``n_earlier``), the classes learned before the task.
    """

    def __init__(self, n_real: int, n_total: int, tc: TrainConfig, n_earlier: int = 0) -> None:
        self.n_real, self.n_total = n_real, n_total
        self.per_step = tc.images_per_step
        self.generated = tc.generated_per_step if n_total > n_real else None
        if self.generated is not None and tc.generated_per_step_per_class is not None:
            self.generated = max(self.generated, tc.generated_per_step_per_class * n_earlier)
        self.order = torch.empty(0, dtype=torch.long)
        self.gen_order = torch.empty(0, dtype=torch.long)
        self.gen_at = 0

    @property
    def n_budget(self) -> int:
        """Images the step budget counts: the real ones when generated ones are drawn apart."""
        return self.n_total if self.generated is None else self.n_real

    def images(self, step: int, per_epoch: int, gen: torch.Generator) -> torch.Tensor:
        """Indices (B,) of step ``step``'s images (B = images_per_step [+ generated_per_step])."""
        at = step % per_epoch
        if at == 0:
            self.order = torch.randperm(self.n_budget, generator=gen)
        real = self.order[at * self.per_step : (at + 1) * self.per_step]
        if self.generated is None:
            return real
        picked = []
        need = self.generated
        while need > 0:
            if self.gen_at >= self.gen_order.numel():
                self.gen_order = self.n_real + torch.randperm(
                    self.n_total - self.n_real, generator=gen)
                self.gen_at = 0
            take = self.gen_order[self.gen_at : self.gen_at + need]
            self.gen_at += take.numel()
            need -= take.numel()
            picked.append(take)
        return torch.cat([real, *picked])


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
    """Apply the strategy's freezing for task t (E6 and adapters: whole flows with their
    mean-content maps, E5 leading couplings; adapters also the prototype projection unless
    prototypes are fixed).

    Returns the frozen modules; training keeps them in eval mode, so frozen means frozen:
    not even the spectral norm's power iteration touches them. The caller unfreezes the
    current task's adapter.
    """
    tc = params.train
    frozen: list[nn.Module] = []
    if tc.strategy in ("freeze_after_first", "adapters") and t > 0:
        frozen = [model.flows]
        if params.flow.mean_condition_dim:
            frozen.append(model.mean_projs)  # part of every coupling's condition
        if tc.strategy == "adapters" and params.flow.prototypes != "fixed":
            frozen.append(model.protos)
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
    """flow.class_norm: each new class's per-channel mean/std over all its fit patches; with
    ``class_norm_mean: position`` the mean is the class's mean map over its fit images (one
    mean per position; low-rank with ``class_mean_rank``) and the std is that of the
    deviations from the map the flow keeps."""
    for cid, split in fit.items():
        for lvl, f in enumerate(split.features):
            maps = f.float().flatten(2).transpose(1, 2)  # (N, H*W, D)
            if model.positional_mean:
                model.set_class_stats(lvl, cid, maps.mean(dim=0), torch.ones(f.shape[1]))
                # the map the flow will subtract: the mean itself, or its low-rank form
                kept = model.class_mean_map(lvl, cid).to(maps.device)
                std = (maps - kept).reshape(-1, f.shape[1]).std(dim=0)
                model.set_class_std(lvl, cid, std.clamp_min(1e-6))
            else:
                flat = maps.reshape(-1, f.shape[1])
                model.set_class_stats(lvl, cid, flat.mean(dim=0),
                                      flat.std(dim=0).clamp_min(1e-6))


class _RowKeeper:
    """Holds the earlier classes' rows of the per-class parameters (embedding, class ActNorm)
    and puts them back after every optimizer step: they share a tensor with the new classes'
    rows, and weight decay would otherwise move them (train.strategy adapters: an earlier
    class must stay bit-identical)."""

    def __init__(self, model: CCNF, n_old: int) -> None:
        self.params = [model.embedding] + [
            getattr(model, f"actnorm_{lvl}") for lvl in range(model.n_levels)
            if model.cfg.class_actnorm
        ]
        self.saved = [p.detach()[:n_old].clone() for p in self.params]
        self.n_old = n_old

    @torch.no_grad()
    def restore(self) -> None:
        for p, rows in zip(self.params, self.saved, strict=True):
            p[: self.n_old] = rows


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
    strategies = (
        "naive", "freeze_after_first", "replay", "joint", "adapters", "generative_replay"
    )
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

    def footprint(self) -> dict[str, int]:
        return {**super().footprint(),
                "stored_images": sum(len(idx) for idx in self.replay.values())}

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
    @classmethod
    def min_training_steps(cls, params: Params, tasks: list[dict[str, int]]) -> int:
        """Each task's :class:`Schedule` on its own classes' images (replayed and generated
        images can only add epochs)."""
        return sum(
            Schedule.for_task(params, t, sum(task.values()), len(task)).total_steps
            for t, task in enumerate(tasks) if task
        )

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
        tc = params.train
        data = _stack_task({**fit, **replayed}).to(device)
        n_real = data.labels.numel()
        if tc.strategy == "generative_replay" and offset > 0:
            gen_z = torch.Generator().manual_seed(stream_seed(params.seed, "generate", t))
            data = data + generate_task_data(
                model, list(range(offset)), tc.generated_per_class, tc.generation_tau, gen_z,
                targets=params.loss.distill_target if params.loss.lambda_distill > 0 else None)
        draw = _BatchDraw(n_real, data.labels.numel(), tc, n_earlier=offset)
        if params.flow.feature_norm and t == 0:
            _set_feature_stats(model, data)

        build_heads(model, params.loss)
        frozen = _freeze(model, params, t)
        if tc.strategy == "adapters" and t > 0:
            for p in model.add_adapter(tc.adapter_rank, class_ids, tc.adapter_film_rank,
                                       tc.adapter_storage, stacked=tc.adapter_stack):
                p.requires_grad_(True)
        # flow.class_adapter_rank: each new class its own adapter, learned beside the shared
        # flow at the adapters' learning rate
        per_class = [p for cid in class_ids for p in model.add_adapter(
            params.flow.class_adapter_rank, [cid], storage=tc.adapter_storage)
        ] if params.flow.class_adapter_rank else []
        keep = _RowKeeper(model, offset) if tc.strategy == "adapters" and offset else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        # adapters: a task after the first trains only its adapter and its classes' rows, at
        # their own learning rate (low-rank factors starting from B = 0 need larger steps)
        lr = tc.adapter_lr if tc.strategy == "adapters" and t > 0 else tc.lr
        # the shared group keeps the model's parameter order (the grad-norm clip sums in it)
        in_group = {id(p) for p in per_class}
        optimizer = AdamW([p for p in trainable if id(p) not in in_group], lr=lr,
                          weight_decay=tc.weight_decay)
        if per_class:
            optimizer.add_param_group(per_class, lr=tc.adapter_lr)
        schedule = Schedule.for_task(params, t, draw.n_budget, len(names))
        gen = torch.Generator().manual_seed(stream_seed(params.seed, "batches", t))
        seen = torch.arange(offset + len(names), device=device)
        # L_mi / L_e candidates: the task's own classes (replayed and generated images of
        # earlier classes are never pushed against them), or every seen class (loss.negatives)
        negatives = (seen if params.loss.negatives == "seen"
                     else torch.tensor(class_ids, dtype=torch.long, device=device))
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
            for _ in range(schedule.rounds):
                for i in range(steps):
                    for group in optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * schedule.lr_factor(i, tc)
                    images = draw.images(i, per_epoch, gen)
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
                    if keep is not None:
                        keep.restore()
                    model.global_step += 1
                    if inputs.after_step is not None:
                        inputs.after_step(len(rows) + 1, schedule.total_steps)
                    rows.append(
                        {"step": step, "task": t, "epoch": schedule.budget.epoch_of(i),
                         "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
                        | {k_: v.item() for k_, v in means.items()}
                    )
                    progress.update(bar, advance=1, loss=f"{loss.item():.4f}")
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(f"non-finite weights after task {task}; nothing written")
        if model.n_adapters:
            model.round_adapters()
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
