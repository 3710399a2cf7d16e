"""The per-class baselines behind the model contract: one model per class, in a ClassBank.

Learning a task fits one fresh, seeded model per new class (:class:`ccnf.baselines.ClassBank`);
no earlier class is touched, so a bank cannot forget and ``train.strategy`` does not apply.
The torch modules live in :mod:`ccnf.baselines`; this module is the glue between them and the
pipeline. Class selection: the class whose model gives the image the highest likelihood
(mean over levels of -log p(X) / (D_l H_l W_l)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from ccnf.baselines import BANK_KINDS, ClassBank, bank_patch_scores
from ccnf.baselines.bank import MODELS
from ccnf.errors import CcnfError
from ccnf.models.base import AnomalyModel, TaskInputs
from ccnf.patch_scores import PatchScores
from ccnf.schedule import TrainSpec
from ccnf.seeding import class_seed

if TYPE_CHECKING:
    from ccnf.config import Params
    from ccnf.features import FeatureMeta


def model_spec(params: Params, channels: list[int], grids: list[list[int]]) -> dict[str, Any]:
    """Constructor kwargs of ``params.model.kind``'s per-class model (from model.* / flow.*)."""
    kind = params.model.kind
    base = {"channels": [int(c) for c in channels], "grids": [[int(h), int(w)] for h, w in grids]}
    m, f = params.model, params.flow
    if kind == "gaussian":
        return {**base, "eps": m.gaussian_eps}
    if kind == "flow_bank":
        n_levels = len(channels)
        return {
            **base,
            "n_couplings": [f.couplings_at(lvl, n_levels) for lvl in range(n_levels)],
            "hidden_dims": [f.hidden_at(lvl, n_levels, int(c)) for lvl, c in enumerate(channels)],
            "clamp_alpha": f.clamp_alpha,
            "spectral_norm": f.spectral_norm,
            "pos_dim": f.pos_dim,
            "warmup_steps": f.warmup_steps,
            # a one-class model: task 0's statistics and the class's own are the same
            "feature_norm": f.feature_norm or f.class_norm,
            # the class's mean map, as CCNF subtracts it (flow.class_norm_mean: position)
            "position_mean": f.class_norm and f.class_norm_mean == "position",
            # only when on: the checkpoints of banks without it keep their bytes
            **({"mean_condition_dim": f.mean_condition_dim} if f.mean_condition_dim else {}),
        }
    if kind == "fastflow":
        return {
            **base,
            "n_steps": [f.couplings_at(lvl, len(channels)) for lvl in range(len(channels))],
            "hidden_ratio": m.fastflow_hidden_ratio,
            "kernel": m.fastflow_kernel,
            "clamp_alpha": f.clamp_alpha,
            "warmup_steps": f.warmup_steps,
        }
    raise CcnfError(
        f"model.kind '{kind}' is not a per-class bank model",
        where="params.yaml: model.kind",
        fix=f"use one of {', '.join(BANK_KINDS)} here (ccnf is the shared CCNF model)",
    )


class BankModel(AnomalyModel):
    """A :class:`ClassBank` of ``kind``'s per-class models."""

    kind: ClassVar[str]

    def __init__(self, bank: ClassBank) -> None:
        self.bank = bank

    @classmethod
    def create(cls, params: Params, meta: FeatureMeta) -> BankModel:
        return cls(ClassBank(cls.kind, model_spec(params, meta.channels, meta.grids)))

    @classmethod
    def restore(
        cls, ckpt: dict[str, Any], params: Params, meta: FeatureMeta | None,
        device: torch.device,
    ) -> BankModel:
        spec = None if meta is None else model_spec(params, meta.channels, meta.grids)
        return cls(ClassBank.from_checkpoint(ckpt, expected_kind=cls.kind, expected_spec=spec,
                                             device=device))

    def state(self) -> dict[str, Any]:
        ckpt = self.bank.checkpoint(n_parameters=self.bank.n_parameters())
        return {k: v for k, v in ckpt.items() if k not in ("kind", "classes")}

    @property
    def classes(self) -> list[str]:
        return self.bank.classes

    def learn_task(
        self, inputs: TaskInputs, params: Params, *, console: Console | None = None
    ) -> list[dict[str, float]]:
        """Fit one model per new class on its fit images (seeded by the class's global index)."""
        rows: list[dict[str, float]] = []
        for name in track(
            inputs.classes, description=f"train t{inputs.task} ({self.kind})", console=console,
            disable=console is None,
        ):
            seed = class_seed(params.seed, params.classes.index(name))
            log = self.bank.add_class(name, inputs.classes[name].features,
                                      TrainSpec.of(params.train), seed)
            # the bank's optimizer steps already stop on a non-finite loss or gradient norm
            rows += [{"step": len(rows) + i, "task": inputs.task, **row}
                     for i, row in enumerate(log)]
        return rows

    @classmethod
    def min_training_steps(cls, params: Params, tasks: list[dict[str, int]]) -> int:
        """Each class's own fit, one after another (:meth:`PerClassModel.fit_steps`)."""
        per_class = MODELS[cls.kind]
        spec = TrainSpec.of(params.train)
        return sum(per_class.fit_steps(n, spec) for task in tasks for n in task.values())

    def patch_scores(
        self, features: list[torch.Tensor], classes: list[str], batch_images: int
    ) -> PatchScores:
        """Image i under class classes[i]'s model; images grouped by class, then re-ordered."""
        groups = {
            name: torch.tensor([i for i, c in enumerate(classes) if c == name])
            for name in dict.fromkeys(classes)
        }
        parts = {
            name: bank_patch_scores(self.bank[name], [f[idx] for f in features], batch_images)
            for name, idx in groups.items()
        }
        if len(parts) == 1:
            return next(iter(parts.values()))
        order = torch.argsort(torch.cat(list(groups.values())))
        merged = PatchScores.cat(list(parts.values()))
        return PatchScores({s: [lv[order] for lv in levels] for s, levels in merged.levels.items()})

    def select(
        self,
        features: list[torch.Tensor],
        candidates: list[str],
        batch_images: int,
        level: int | None,
    ) -> dict[str, np.ndarray]:
        stat = -self.bank.selection_scores(features, candidates).double().cpu().numpy()
        return {"likelihood": np.argmax(stat, axis=1)}


class GaussianKind(BankModel):
    kind = "gaussian"


class FlowBankKind(BankModel):
    kind = "flow_bank"


class FastFlowKind(BankModel):
    kind = "fastflow"
