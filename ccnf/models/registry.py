"""``model.kind`` -> the class that implements it: the one list of the study's models.

Adding a model: write one module with an :class:`ccnf.models.base.AnomalyModel` subclass and
add one line here. Entries are import paths, so reading params (which checks ``model.kind``
against this list) imports no model code until a model is needed.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

import torch

from ccnf.errors import CcnfError

if TYPE_CHECKING:
    from ccnf.config import Params
    from ccnf.features import FeatureMeta
    from ccnf.models.base import AnomalyModel

MODELS: dict[str, str] = {
    "ccnf": "ccnf.models.ccnf:CCNFModel",
    "flow_bank": "ccnf.models.bank:FlowBankKind",
    "fastflow": "ccnf.models.bank:FastFlowKind",
    "gaussian": "ccnf.models.bank:GaussianKind",
}


def model_class(kind: str) -> type[AnomalyModel]:
    """The class registered for ``kind``."""
    if kind not in MODELS:
        close = difflib.get_close_matches(kind, list(MODELS), n=1)
        raise CcnfError(
            f"model.kind '{kind}' is not a registered model"
            + (f" (did you mean '{close[0]}'?)" if close else ""),
            where="params.yaml: model.kind",
            fix=f"use one of {', '.join(MODELS)} (ccnf/models/registry.py lists them)",
        )
    module, _, name = MODELS[kind].partition(":")
    cls = getattr(importlib.import_module(module), name)
    if getattr(cls, "kind", None) != kind:
        raise CcnfError(f"{MODELS[kind]} declares kind {getattr(cls, 'kind', None)!r}, "
                        f"registered as {kind!r}", fix="fix ccnf/models/registry.py")
    return cls


def check_params(params: Params) -> type[AnomalyModel]:
    """``params.model.kind``'s class, after checking that it supports the params' strategy,
    class selection and headline score (config.py cannot: reading params imports no model)."""
    model = model_class(params.model.kind)
    kind, where = params.model.kind, "params.yaml"
    if params.train.strategy not in model.strategies:
        raise CcnfError(
            f"train.strategy '{params.train.strategy}' does not apply to model.kind '{kind}' "
            f"(it supports {', '.join(model.strategies)}; a per-class bank learns each class "
            "once and cannot forget)",
            where=f"{where}: train.strategy", fix=f"use train.strategy={model.strategies[0]}",
        )
    selects = (*model.select_methods, "oracle")
    if params.score.class_select not in selects:
        raise CcnfError(
            f"score.class_select '{params.score.class_select}' is not available for "
            f"model.kind '{kind}' (prototype needs CCNF's class centres)",
            where=f"{where}: score.class_select", fix=f"use one of {', '.join(selects)}",
        )
    scores = model.map_scores + (("hybrid",) if {"nf", "proto"} <= set(model.map_scores) else ())
    if params.score.headline not in scores:
        raise CcnfError(
            f"score.headline '{params.score.headline}' is not a score of model.kind '{kind}' "
            "(proto and hybrid need CCNF's prototypes)",
            where=f"{where}: score.headline", fix=f"use one of {', '.join(scores)}",
        )
    return model


def create_model(params: Params, meta: FeatureMeta) -> AnomalyModel:
    """The empty model of ``params.model.kind`` (init stage)."""
    return check_params(params).create(params, meta)


def restore_model(
    ckpt: dict[str, Any], params: Params, meta: FeatureMeta | None, device: torch.device,
    *, where: str = "checkpoint",
) -> AnomalyModel:
    """The model a checkpoint holds; its kind must be the params' ``model.kind``."""
    if ckpt["kind"] != params.model.kind:
        raise CcnfError(
            f"{where} holds a '{ckpt['kind']}' model but model.kind is '{params.model.kind}'",
            where=where,
            fix="model.kind changed since this checkpoint was written: dvc repro",
        )
    return check_params(params).restore(ckpt, params, meta, device)
