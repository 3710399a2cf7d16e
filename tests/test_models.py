"""The model contract: the registry, the versioned checkpoint, and what a kind may refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ccnf.config import parse_params
from ccnf.errors import CcnfError
from ccnf.models import (
    CHECKPOINT_FORMAT,
    MODELS,
    AnomalyModel,
    model_class,
    read_checkpoint,
    restore_model,
)
from ccnf.store import save_artifact


def test_every_registered_kind_is_a_model_that_names_itself() -> None:
    assert set(MODELS) == {"ccnf", "flow_bank", "fastflow", "gaussian"}
    for kind in MODELS:
        cls = model_class(kind)
        assert issubclass(cls, AnomalyModel) and cls.kind == kind
        assert "nf" in cls.map_scores and "naive" in cls.strategies
    with pytest.raises(CcnfError, match="did you mean 'flow_bank'"):
        model_class("flowbank")


def test_a_checkpoint_of_another_layout_is_refused(tmp_path: Path) -> None:
    save_artifact(tmp_path / "model.pt", {"state_dict": {}, "classes": []}, kind="checkpoint")
    with pytest.raises(CcnfError, match="layout version none"):
        read_checkpoint(tmp_path)
    save_artifact(tmp_path / "model.pt", {"format": CHECKPOINT_FORMAT, "kind": "gaussian",
                                          "classes": [], "task": -1, "calibration": {}},
                  kind="checkpoint")
    assert read_checkpoint(tmp_path)["kind"] == "gaussian"


def test_a_checkpoint_of_another_kind_is_refused(tmp_path: Path, raw_params: dict) -> None:
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": "gaussian", "classes": [], "task": -1,
            "calibration": {}}
    params = parse_params(raw_params)  # model.kind: ccnf
    with pytest.raises(CcnfError, match=r"holds a 'gaussian' model but model\.kind is 'ccnf'"):
        restore_model(ckpt, params, None, torch.device("cpu"))
