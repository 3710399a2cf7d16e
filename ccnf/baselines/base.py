"""The interface every per-class baseline model implements (issue 4).

A per-class model sees the cached training features of exactly one class, once, and afterwards
only scores. Feature lists follow the cache: ``feats[l]`` is (N, C_l, H_l, W_l) for level l
(any float dtype; fp16 from the cache is upcast to float32 here).

Patch scores are "higher = more anomalous", one map per level, (B, 1, H_l, W_l), for each of
the two density scores CCNF also has: ``nf`` = -log p(x) / D_l and ``latent`` = the Gaussian
term alone (0.5 ||z||^2 / D_l for a flow, half the squared Mahalanobis distance / D_l for the
Gaussian). They go through the same upsample / level fusion / blur / pooling as CCNF's scores
(:mod:`ccnf.baselines.maps`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ccnf.errors import CcnfError, NonFiniteLossError
from ccnf.flows.log_scale import warmup_factor
from ccnf.optim import AdamW
from ccnf.schedule import StepBudget, TrainSpec, lr_factor


class PerClassModel(nn.Module, ABC):
    """One class's anomaly model over L feature levels.

    Args:
        channels: C_l per level.  grids: (H_l, W_l) per level.
    """

    kind: ClassVar[str]

    def __init__(self, channels: list[int], grids: list[list[int]]) -> None:
        super().__init__()
        if len(channels) != len(grids):
            raise ValueError(f"{len(channels)} channel counts but {len(grids)} grids")
        self.channels = [int(c) for c in channels]
        self.grids = [[int(h), int(w)] for h, w in grids]

    # -- what subclasses provide ---------------------------------------------------------------
    @classmethod
    def fit_steps(cls, n_images: int, train: TrainSpec) -> int:
        """Optimizer steps :meth:`fit` takes on ``n_images`` images: the budget of
        :meth:`train_epochs` (a kind fitted in closed form overrides this with 0)."""
        return StepBudget.of(n_images, 1, train).steps

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able): enough to rebuild the empty model."""

    @abstractmethod
    def fit(
        self, feats: list[torch.Tensor], train: TrainSpec, gen: torch.Generator
    ) -> list[dict[str, float]]:
        """Learn the class from its training features; returns one log row per optimizer step.

        All randomness of training comes from ``gen`` (CPU generator), so a fit is a pure
        function of (initial weights, features, train params, generator seed).
        """

    @abstractmethod
    def patch_scores(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """feats[l] (B, C_l, H_l, W_l) -> {"nf" | "latent": per level (B, 1, H_l, W_l)}
        anomaly scores (float32)."""

    # -- shared helpers ------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.channels)

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def n_parameters(self) -> int:
        """Stored real values: learned weights plus estimated statistics (float state only).

        Integer bookkeeping (permutations, step counters) is not counted; it is in the
        checkpoint bytes.
        """
        return sum(v.numel() for v in self.state_dict().values() if v.is_floating_point())

    def warm(self) -> float:
        """Additive-to-affine factor min(1, step / warmup_steps), as in CCNF (flow baselines
        keep ``warmup_steps`` and a ``global_step`` buffer)."""
        return warmup_factor(self.global_step, self.warmup_steps)

    def train_epochs(
        self,
        n: int,
        train: TrainSpec,
        gen: torch.Generator,
        loss_of: Callable[[torch.Tensor], torch.Tensor],
    ) -> list[dict[str, float]]:
        """AdamW over shuffled passes of the n training images for the budget of one class
        (:class:`ccnf.schedule.StepBudget`: ``train.epochs`` passes, at least
        ``train.min_steps_per_class`` steps), learning rate by ``train.lr_schedule``.

        loss_of(images (b,) indices) -> scalar loss of that step. Returns one log row per step;
        leaves the model in eval mode.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        opt = AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        budget = StepBudget.of(n, 1, train)
        rows: list[dict[str, float]] = []
        self.train()
        order = torch.empty(0, dtype=torch.long)
        for i in range(budget.steps):
            at = i % budget.steps_per_epoch
            if at == 0:
                order = torch.randperm(n, generator=gen).to(self.device)
            for group in opt.param_groups:
                group["lr"] = train.lr * lr_factor(i, budget.steps, train)
            images = order[at * train.images_per_step : (at + 1) * train.images_per_step]
            loss = loss_of(images)
            step = self.optimizer_step(loss, opt, params, train.grad_clip)
            rows.append({"step": step, "epoch": budget.epoch_of(i), "loss": loss.item(),
                         "L_g": loss.item()})
        self.eval()
        return rows

    def optimizer_step(
        self,
        loss: torch.Tensor,
        opt: AdamW,
        params: list[torch.nn.Parameter],
        grad_clip: float | None,
    ) -> int:
        """One checked optimizer step of a flow baseline; returns the step's index.

        A non-finite loss or gradient norm stops training with NonFiniteLossError (nothing is
        written). Subclasses that train keep a ``global_step`` buffer.
        """
        step = int(self.global_step)
        check_finite(loss, "loss", step, self.kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            check_finite(norm, "gradient norm", step, self.kind)
        opt.step()
        self.global_step += 1
        return step

    def check_features(self, feats: list[torch.Tensor], where: str) -> list[torch.Tensor]:
        """Validate shapes against the model's levels; return float32 copies on its device."""
        if len(feats) != self.n_levels:
            raise CcnfError(
                f"{self.kind} model has {self.n_levels} feature levels, got {len(feats)}",
                where=where,
                fix="the feature cache changed since the model was built: re-run the train stage",
            )
        out = []
        for lvl, (f, c, (h, w)) in enumerate(zip(feats, self.channels, self.grids, strict=True)):
            if f.dim() != 4 or tuple(f.shape[1:]) != (c, h, w):
                raise CcnfError(
                    f"level {lvl} features have shape {tuple(f.shape)}, the {self.kind} model "
                    f"expects (N, {c}, {h}, {w})",
                    where=where,
                    fix="backbone.* or data.image_size changed: re-run extract and train",
                )
            out.append(f.to(self.device, torch.float32))
        return out


def require_images(n: int, minimum: int, kind: str) -> None:
    if n < minimum:
        raise CcnfError(
            f"{kind} needs at least {minimum} training images per class, got {n}",
            where="baseline fit",
            fix="add training images or lower eval.calib_fraction",
        )


def check_finite(value: torch.Tensor, name: str, step: int, kind: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"non-finite {name} in the {kind} baseline at step {step}; no checkpoint was written",
            where=f"{kind} fit",
            fix="lower train.lr, lower flow.clamp_alpha or set train.grad_clip",
        )
