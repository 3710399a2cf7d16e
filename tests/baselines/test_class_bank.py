"""The per-class bank: earlier classes bit-identical after later tasks, checkpoints, params."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import default_params

from ccnf.baselines import (
    BANK_KINDS,
    ClassBank,
    bank_patch_scores,
    nbytes,
)
from ccnf.config import Params, ScoreConfig, TrainConfig, parse_params
from ccnf.errors import CcnfError
from ccnf.models.bank import model_spec
from ccnf.schedule import TrainSpec
from ccnf.scoring import assemble
from ccnf.seeding import class_seed
from ccnf.store import load_artifact, save_artifact

CHANNELS = [4, 6]
GRIDS = [[4, 4], [2, 2]]
TRAIN = TrainSpec.of(TrainConfig(epochs=2, images_per_step=4, patches_per_image=6, lr=2e-3))


def _bank(params: Params) -> ClassBank:
    return ClassBank(params.model.kind, model_spec(params, CHANNELS, GRIDS))


def _params(kind: str):
    raw = default_params()
    raw["model"]["kind"] = kind
    raw["score"]["class_select"] = "likelihood"  # a bank has no prototypes
    raw["flow"].update(n_couplings=2, hidden_dim=8, pos_dim=4, warmup_steps=2)
    return parse_params(raw)


def _feats(n: int, seed: int, offset: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, c, h, w, generator=g) * 2 + offset
        for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]


def _snapshot(bank: ClassBank, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bank[name].state_dict().items()}


@pytest.mark.parametrize("kind", BANK_KINDS)
def test_earlier_classes_are_bit_identical_after_later_tasks(kind: str, tmp_path: Path) -> None:
    params = _params(kind)
    spec = model_spec(params, CHANNELS, GRIDS)
    probe = _feats(3, 100)
    # task 0: class a; its checkpoint goes to disk, as between two DVC train stages
    bank = _bank(params)
    bank.add_class("a", _feats(8, 1), TRAIN, class_seed(0, 0))
    state_a = _snapshot(bank, "a")
    scores_a = bank.patch_scores("a", probe)
    save_artifact(tmp_path / "t0.pt", bank.checkpoint(task=0), kind="checkpoint")
    # task 1: resume, learn b and c, score everything (as evaluation does), checkpoint again
    bank = ClassBank.from_checkpoint(
        load_artifact(tmp_path / "t0.pt", kind="checkpoint", fix=""), expected_kind=kind,
        expected_spec=spec,
    )
    for i, name in enumerate(["b", "c"], start=1):
        bank.add_class(name, _feats(8, 1 + i, offset=float(i)), TRAIN, class_seed(0, i))
    bank.selection_scores(probe)
    bank["a"].train()  # a careless caller: scoring must still not move anything
    bank.patch_scores("a", probe)
    save_artifact(tmp_path / "t1.pt", bank.checkpoint(task=1), kind="checkpoint")
    final = ClassBank.from_checkpoint(load_artifact(tmp_path / "t1.pt", kind="checkpoint", fix=""))
    assert final.classes == ["a", "b", "c"]
    for k, v in final["a"].state_dict().items():
        assert torch.equal(v, state_a[k]), f"{kind}: class a's {k} changed"
    again = final.patch_scores("a", probe)
    assert set(again) == {"nf", "latent"}
    for name in again:
        for x, y in zip(again[name], scores_a[name], strict=True):
            assert torch.equal(x, y)
    assert not any(p.requires_grad for p in final["a"].parameters())


@pytest.mark.parametrize("kind", BANK_KINDS)
def test_a_class_model_does_not_depend_on_earlier_classes(kind: str) -> None:
    """Seeded per class: b learned after a equals b learned alone; the global RNG is untouched."""
    params = _params(kind)
    alone = _bank(params)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    rows_alone = alone.add_class("b", _feats(8, 2), TRAIN, class_seed(0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)
    after = _bank(params)
    after.add_class("a", _feats(8, 1), TRAIN, class_seed(0, 0))
    rows_after = after.add_class("b", _feats(8, 2), TRAIN, class_seed(0, 1))
    assert rows_alone == rows_after
    for k, v in alone["b"].state_dict().items():
        assert torch.equal(v, after["b"].state_dict()[k]), k
    assert class_seed(0, 0) != class_seed(0, 1) != class_seed(1, 1)


@pytest.mark.parametrize("kind", BANK_KINDS)
def test_memory_grows_per_class_and_selection_finds_the_class(kind: str) -> None:
    bank = _bank(_params(kind))
    train = dataclasses.replace(TRAIN, epochs=12, lr=1e-2)
    bank.add_class("low", _feats(10, 1, offset=-6.0), train, 1)
    one_params, one_bytes = bank.n_parameters(), bank.checkpoint_nbytes()
    bank.add_class("high", _feats(10, 2, offset=6.0), train, 2)
    assert bank.n_parameters() == 2 * one_params == 2 * bank.n_parameters("low") > 0
    payload = [
        sum(v.numel() * v.element_size() for v in sd.values())
        for sd in bank.checkpoint()["state_dicts"].values()
    ]
    assert payload[0] == payload[1] > 0  # tensor bytes double; file bytes add zip overhead
    assert bank.checkpoint_nbytes() > one_bytes + payload[1]
    assert bank.checkpoint_nbytes("low") == nbytes(bank["low"].state_dict())
    sel = bank.selection_scores(_feats(4, 7, offset=6.0))
    assert sel.shape == (4, 2) and torch.all(sel.argmin(dim=1) == 1)
    patches = bank_patch_scores(bank["high"], _feats(5, 8), 2)
    scores = assemble(patches, ScoreConfig(), 16)
    assert scores.maps["nf"].shape == (5, 16, 16) and scores.images["latent"].shape == (5,)
    assert patches.proto_image is None and "proto" not in scores.images


def test_bank_errors_are_clear() -> None:
    params = _params("gaussian")
    bank = _bank(params)
    bank.add_class("a", _feats(4, 1), TRAIN, 0)
    with pytest.raises(CcnfError, match="already in the gaussian bank"):
        bank.add_class("a", _feats(4, 1), TRAIN, 0)
    with pytest.raises(CcnfError, match="not in the gaussian bank"):
        bank.patch_scores("zzz", _feats(1, 0))
    with pytest.raises(CcnfError, match=r"model\.kind is 'fastflow'"):
        ClassBank.from_checkpoint(bank.checkpoint(), expected_kind="fastflow")
    other = model_spec(
        _params("gaussian").model_copy(
            update={"model": params.model.model_copy(update={"gaussian_eps": 0.5})}
        ),
        CHANNELS,
        GRIDS,
    )
    with pytest.raises(CcnfError, match="differs from the params"):
        ClassBank.from_checkpoint(bank.checkpoint(), expected_spec=other)
    with pytest.raises(CcnfError, match="not a per-class bank model"):
        model_spec(_params("ccnf"), CHANNELS, GRIDS)
    with pytest.raises(CcnfError, match="not a per-class bank"):
        ClassBank.from_checkpoint({"state_dict": {}})
