from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_mvtec_root, tiny_params

from ccnf.config import parse_params
from ccnf.data.manifest import index_root
from ccnf.errors import CcnfError, NonFiniteLossError
from ccnf.evaluate import evaluate_task
from ccnf.features import extract_features, load_split
from ccnf.flows.ccnf import read_checkpoint
from ccnf.train import calibration_split, init_model, train_task


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("train")
    root = make_mvtec_root(tmp / "ds", ["a", "b", "c", "d"], n_train=5)
    raw = tiny_params(root, [["a", "b"], ["c", "d"]])
    params = parse_params(raw)
    manifest = index_root(root, params.classes, progress=False)
    extract_features(manifest, params, tmp / "features")
    init_model(params, tmp / "features", tmp / "models" / "init")
    return tmp, raw


def _train(tmp: Path, raw: dict, out: str, task: str = "t0", prev: str = "init") -> Path:
    params = parse_params(raw)
    train_task(params, task, tmp / "features", tmp / "models" / prev, tmp / out)
    return tmp / out


def test_training_is_deterministic(prepared) -> None:
    tmp, raw = prepared
    a = read_checkpoint(_train(tmp, raw, "run_a"))["state_dict"]
    b = read_checkpoint(_train(tmp, raw, "run_b"))["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp / "run_a" / "train_log.tsv").read_text() == (
        tmp / "run_b" / "train_log.tsv"
    ).read_text()


def test_checkpoint_holds_classes_calibration_and_log(prepared) -> None:
    tmp, raw = prepared
    ckpt = read_checkpoint(_train(tmp, raw, "models/t0"))
    assert ckpt["classes"] == ["a", "b"] and ckpt["n_classes"] == 2
    assert set(ckpt["calibration"]) == {"a", "b"}
    log = (tmp / "models/t0/train_log.tsv").read_text().splitlines()
    assert log[0].split("\t")[:4] == ["step", "task", "epoch", "loss"]
    assert len(log) > 1
    ckpt1 = read_checkpoint(_train(tmp, raw, "models/t1", task="t1", prev="t0"))
    assert ckpt1["classes"] == ["a", "b", "c", "d"]
    # calibration of earlier classes is kept from the task that learned them
    assert ckpt1["calibration"]["a"] == ckpt["calibration"]["a"]
    params = parse_params(raw)
    res = evaluate_task(params, "t1", tmp / "features", tmp / "models/t1",
                        tmp / "metrics/t1.json", tmp / "eval/t1")
    assert set(res["per_task"]) == {"t0", "t1"}
    assert set(res["per_class"]) == {"a", "b", "c", "d"}
    for cls in res["per_class"].values():
        for score in ("nf", "proto", "hybrid"):
            assert all(0.0 <= v <= 1.0 for v in cls[score].values())


def test_non_finite_loss_stops_without_checkpoint(prepared) -> None:
    tmp, raw = prepared
    bad = {**raw, "train": {**raw["train"], "lr": 1.0e30, "grad_clip": None}}
    bad["flow"] = {**raw["flow"], "spectral_norm": False, "clamp_alpha": 1.0e6}
    bad["loss"] = {**raw["loss"], "lambda_g": 1.0e30}
    with pytest.raises(NonFiniteLossError, match=r"task t0.*step \d+") as info:
        _train(tmp, bad, "nan_run")
    assert "no checkpoint was written" in str(info.value) or "nothing written" in str(info.value)
    assert not (tmp / "nan_run").exists()


def test_wrong_previous_checkpoint_is_rejected(prepared) -> None:
    tmp, raw = prepared
    with pytest.raises(CcnfError, match="expects"):
        _train(tmp, raw, "bad_chain", task="t1", prev="init")


def test_calibration_split_is_disjoint_and_deterministic() -> None:
    fit, cal = calibration_split(20, 0.2, seed=3)
    assert len(cal) == 4 and len(fit) == 16
    assert not set(fit.tolist()) & set(cal.tolist())
    _, cal2 = calibration_split(20, 0.2, seed=3)
    assert torch.equal(cal, cal2)
    with pytest.raises(CcnfError):
        calibration_split(1, 0.2, seed=0)


def test_extract_failure_leaves_no_partial_cache(tmp_path: Path) -> None:
    root = make_mvtec_root(tmp_path / "ds", ["a", "b"], n_train=3)
    raw2 = tiny_params(root, [["a"], ["b"]])
    params = parse_params(raw2)
    manifest = index_root(root, params.classes, progress=False)
    victim = root / "b" / "test" / "hole" / "000.png"
    victim.write_bytes(b"not a png")
    with pytest.raises(CcnfError, match="cannot decode image"):
        extract_features(manifest, params, tmp_path / "features")
    assert not (tmp_path / "features").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".features")] == []


def test_cached_features_have_expected_shapes(prepared) -> None:
    tmp, _ = prepared
    test = load_split(tmp / "features", "a", "test")
    assert [tuple(f.shape[1:]) for f in test.features] == [(40, 8, 8), (112, 4, 4)]
    assert test.features[0].dtype == torch.float16
    assert test.masks is not None and test.masks.shape[1:] == (32, 32)
    assert test.labels.tolist() == [1, 1, 0, 0] or sorted(test.labels.tolist()) == [0, 0, 1, 1]


def test_freeze_after_first_keeps_flows_bit_identical(prepared) -> None:
    tmp, raw = prepared
    t0 = read_checkpoint(_train(tmp, raw, "freeze/t0"))
    frozen = {**raw, "train": {**raw["train"], "strategy": "freeze_after_first"}}
    t1 = read_checkpoint(_train(tmp, frozen, "freeze/t1", task="t1", prev="../freeze/t0"))
    flow_keys = [k for k in t0["state_dict"] if k.startswith("flows.")]
    assert flow_keys
    for k in flow_keys:  # weights and spectral-norm buffers alike
        assert torch.equal(t0["state_dict"][k], t1["state_dict"][k]), k
    # the new classes' embeddings did learn
    emb0, emb1 = t0["state_dict"]["embedding"], t1["state_dict"]["embedding"]
    assert emb1.shape[0] == emb0.shape[0] + 2
    naive = read_checkpoint(_train(tmp, raw, "naive/t1", task="t1", prev="../freeze/t0"))
    assert any(not torch.equal(t0["state_dict"][k], naive["state_dict"][k]) for k in flow_keys)


def test_replay_buffer_is_bounded_and_class_balanced() -> None:
    from ccnf.train import update_replay_buffer

    buf = update_replay_buffer({}, {"a": list(range(10)), "b": list(range(10))}, 6, seed=0)
    assert {k: len(v) for k, v in buf.items()} == {"a": 3, "b": 3}
    buf2 = update_replay_buffer(buf, {"c": [4, 5, 6], "d": [7, 8]}, 6, seed=1)
    assert sum(len(v) for v in buf2.values()) <= 6
    assert buf2["a"] == buf["a"][:1] and buf2["b"] == buf["b"][:1]
    assert set(buf2["c"]) <= {4, 5, 6} and set(buf2["d"]) <= {7, 8}


def test_replay_trains_on_buffer_and_never_exceeds_it(prepared) -> None:
    tmp, raw = prepared
    rep = {**raw, "train": {**raw["train"], "strategy": "replay", "replay_buffer": 4}}
    t0 = read_checkpoint(_train(tmp, rep, "replay/t0"))
    assert sum(len(v) for v in t0["replay"].values()) <= 4 and set(t0["replay"]) == {"a", "b"}
    calib_a = set(calibration_split(5, rep["eval"]["calib_fraction"], rep["seed"])[1].tolist())
    assert not set(t0["replay"]["a"]) & calib_a  # never the calibration slice
    t1 = read_checkpoint(_train(tmp, rep, "replay/t1", task="t1", prev="../replay/t0"))
    assert sum(len(v) for v in t1["replay"].values()) <= 4
    assert set(t1["replay"]) == {"a", "b", "c", "d"}
    naive_t1 = _train(tmp, raw, "noreplay/t1", task="t1", prev="../replay/t0")
    steps = len((tmp / "replay/t1/train_log.tsv").read_text().splitlines())
    naive_steps = len((naive_t1 / "train_log.tsv").read_text().splitlines())
    assert steps > naive_steps  # the buffered images were trained on
    assert read_checkpoint(naive_t1)["replay"] == {}


def test_replay_without_buffer_is_rejected(raw_params: dict) -> None:
    raw_params["train"]["strategy"] = "replay"
    with pytest.raises(CcnfError, match="replay_buffer is 0"):
        parse_params(raw_params)
