"""A bank of per-class models: {class name -> model}, grown one class at a time.

Learning a class builds a fresh model (seeded), fits it on that class's features and adds it;
no earlier model is touched (no optimizer, no forward in train mode, no statistics update), so
earlier classes are bit-identical after any later task: no forgetting, by construction, at the
cost of memory that grows linearly with the classes. The checkpoint is the bank: the shared
model spec plus one state dict per class.
"""

from __future__ import annotations

from typing import Any

import torch

from ccnf.baselines.base import PerClassModel
from ccnf.baselines.fastflow import FastFlowModel
from ccnf.baselines.flow_bank import FlowBankModel
from ccnf.baselines.gaussian import GaussianModel
from ccnf.errors import CcnfError
from ccnf.schedule import TrainSpec
from ccnf.store import dumps

MODELS: dict[str, type[PerClassModel]] = {
    GaussianModel.kind: GaussianModel,
    FlowBankModel.kind: FlowBankModel,
    FastFlowModel.kind: FastFlowModel,
}
BANK_KINDS = tuple(MODELS)


def build_model(kind: str, spec: dict[str, Any]) -> PerClassModel:
    """An empty (unfitted) model of ``kind``; initial weights come from the global RNG."""
    if kind not in MODELS:
        raise CcnfError(f"unknown bank model kind '{kind}'", fix=f"one of {BANK_KINDS}")
    kwargs = {k: v for k, v in spec.items() if k not in ("channels", "grids")}
    return MODELS[kind](spec["channels"], spec["grids"], **kwargs)


def nbytes(obj: Any) -> int:
    """Size in bytes of ``obj`` stored as a checkpoint: the checkpoint cost of a model or bank."""
    return len(dumps(obj, kind="checkpoint"))


class ClassBank:
    """{class name -> :class:`PerClassModel`} of one kind and spec, grown by :meth:`add_class`.

    Args:
        kind: gaussian | flow_bank | fastflow.  spec: the models' constructor kwargs (plain
        values; :func:`ccnf.models.bank.model_spec` builds them from params).  device: where
        models live and compute (built on CPU first so initial weights do not depend on it).
    """

    def __init__(self, kind: str, spec: dict[str, Any], device: str | torch.device = "cpu") -> None:
        if kind not in MODELS:
            raise CcnfError(f"unknown bank model kind '{kind}'", fix=f"one of {BANK_KINDS}")
        self.kind = kind
        self.spec = dict(spec)
        self.device = torch.device(device)
        self.models: dict[str, PerClassModel] = {}

    # -- classes -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.models)

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def __getitem__(self, name: str) -> PerClassModel:
        if name not in self.models:
            raise CcnfError(
                f"class '{name}' is not in the {self.kind} bank (it holds {self.classes})",
                fix="score only classes of tasks already trained",
            )
        return self.models[name]

    def add_class(
        self, name: str, feats: list[torch.Tensor], train: TrainSpec, seed: int
    ) -> list[dict[str, float]]:
        """Build, fit and store the model of class ``name``; returns its training log rows.

        feats[l]: (N, C_l, H_l, W_l) the class's training features. Initial weights and all
        training randomness come from ``seed`` alone (the global RNG is left as it was).
        """
        if name in self.models:
            raise CcnfError(
                f"class '{name}' is already in the {self.kind} bank",
                fix="each class belongs to exactly one task (data.classes lists it once)",
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.kind, self.spec)
        model = model.to(self.device)
        rows = model.fit(feats, train, torch.Generator().manual_seed(seed))
        model.eval()
        model.requires_grad_(False)  # a stored class is frozen for good
        self.models[name] = model
        return rows

    # -- scoring -------------------------------------------------------------------------------
    def patch_scores(self, name: str, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Class ``name``'s patch scores: feats[l] (B, C_l, H_l, W_l) -> {score: per level
        (B, 1, H_l, W_l)}."""
        return self[name].patch_scores(feats)

    @torch.no_grad()
    def selection_scores(
        self, feats: list[torch.Tensor], classes: list[str] | None = None
    ) -> torch.Tensor:
        """(B, K) mean patch score of each image under each class's model (lower = more likely).

        The mean over levels of -log p(X) / (D_l H_l W_l) (the nf patch scores): the
        likelihood-based class selection. Argmin over K gives the selected class
        (``score.class_select: likelihood``).
        """
        names = self.classes if classes is None else classes
        cols = []
        for name in names:
            levels = self[name].patch_scores(feats)["nf"]
            cols.append(torch.stack([m.flatten(1).mean(1) for m in levels]).mean(0))
        return torch.stack(cols, dim=1)

    # -- size and checkpoints ------------------------------------------------------------------
    def n_parameters(self, name: str | None = None) -> int:
        """Stored real values of one class's model, or of the whole bank."""
        if name is not None:
            return self[name].n_parameters()
        return sum(m.n_parameters() for m in self.models.values())

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """{kind, spec, classes, state_dicts: {class: state dict}} plus ``extra``."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "classes": self.classes,
            "state_dicts": {
                name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                for name, m in self.models.items()
            },
            **extra,
        }

    def checkpoint_nbytes(self, name: str | None = None) -> int:
        """Serialized size of one class's state dict, or of the whole bank checkpoint."""
        if name is not None:
            return nbytes(self[name].state_dict())
        return nbytes(self.checkpoint())

    @staticmethod
    def from_checkpoint(
        ckpt: dict[str, Any],
        *,
        expected_kind: str | None = None,
        expected_spec: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> ClassBank:
        """Rebuild a bank; with ``expected_*`` (from the current params) a mismatch is an error."""
        if "state_dicts" not in ckpt or "kind" not in ckpt:
            raise CcnfError(
                "checkpoint is not a per-class bank (no 'state_dicts')",
                fix="model.kind changed since this checkpoint was written: dvc repro",
            )
        if expected_kind is not None and ckpt["kind"] != expected_kind:
            raise CcnfError(
                f"checkpoint holds a '{ckpt['kind']}' bank but model.kind is '{expected_kind}'",
                fix="model.kind changed since this checkpoint was written: dvc repro",
            )
        if expected_spec is not None and _jsonish(ckpt["spec"]) != _jsonish(expected_spec):
            raise CcnfError(
                f"checkpoint bank spec {ckpt['spec']} differs from the params' {expected_spec}",
                fix="model.* or flow.* changed since this checkpoint was written: dvc repro",
            )
        bank = ClassBank(ckpt["kind"], ckpt["spec"], device)
        for name in ckpt["classes"]:
            with torch.random.fork_rng(devices=[]):  # init is overwritten; keep the RNG as is
                model = build_model(bank.kind, bank.spec)
            try:
                model.load_state_dict(ckpt["state_dicts"][name], strict=True)
            except RuntimeError as err:
                raise CcnfError(
                    f"class '{name}' state does not match its spec: {str(err).splitlines()[0]}",
                    fix="the checkpoint is from another version: dvc repro",
                ) from None
            model = model.to(bank.device).eval()
            model.requires_grad_(False)
            bank.models[name] = model
        return bank


def _jsonish(obj: Any) -> Any:
    """Normalise tuples to lists so specs compare equal after a save/load round trip."""
    if isinstance(obj, dict):
        return {k: _jsonish(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonish(v) for v in obj]
    return obj
