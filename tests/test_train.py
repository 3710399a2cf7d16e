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
from ccnf.models import read_checkpoint
from ccnf.models.ccnf import CCNFModel, ccnf_spec
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


def _assert_same_calibration(a: dict, b: dict) -> None:
    """Calibration records hold patch-score tensors: equal key by key, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        pairs = zip(va, vb, strict=True) if isinstance(va, list) else [(va, vb)]
        assert all(torch.equal(x, y) for x, y in pairs), key


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
    _assert_same_calibration(ckpt1["calibration"]["a"], ckpt["calibration"]["a"])
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
    from ccnf.models.ccnf import update_replay_buffer

    buf = update_replay_buffer({}, {"a": list(range(10)), "b": list(range(10))}, 6, seed=0)
    assert {k: len(v) for k, v in buf.items()} == {"a": 3, "b": 3}
    buf2 = update_replay_buffer(buf, {"c": [4, 5, 6], "d": [7, 8]}, 6, seed=1)
    assert sum(len(v) for v in buf2.values()) <= 6
    assert buf2["a"] == buf["a"][:1] and buf2["b"] == buf["b"][:1]
    assert set(buf2["c"]) <= {4, 5, 6} and set(buf2["d"]) <= {7, 8}


def test_replay_trains_on_buffer_and_never_exceeds_it(prepared) -> None:
    tmp, raw = prepared
    # epochs decide the budget here (no per-class floor), so buffered images add steps
    raw = _variant(raw, "train", min_steps_per_class=0)
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


def _variant(raw: dict, section: str, **values: object) -> dict:
    return {**raw, section: {**raw[section], **values}}


def test_joint_trains_one_task_on_every_class(prepared) -> None:
    tmp, raw = prepared
    joint = _variant(raw, "train", strategy="joint")
    t0 = read_checkpoint(_train(tmp, joint, "joint/t0"))
    assert t0["classes"] == ["a", "b", "c", "d"] and set(t0["calibration"]) == set("abcd")
    rows = (tmp / "joint/t0/train_log.tsv").read_text().splitlines()[1:]
    assert {r.split("\t")[1] for r in rows} == {"0"}
    t1 = read_checkpoint(_train(tmp, joint, "joint/t1", task="t1", prev="../joint/t0"))
    assert len((tmp / "joint/t1/train_log.tsv").read_text().splitlines()) == 1  # header only
    for k, v in t0["state_dict"].items():
        assert torch.equal(v, t1["state_dict"][k]), k
    assert t1["task"] == 1 and set(t1["calibration"]) == set(t0["calibration"])
    for cls in t0["calibration"]:
        _assert_same_calibration(t1["calibration"][cls], t0["calibration"][cls])


def test_partial_freeze_keeps_leading_couplings_bit_identical(prepared) -> None:
    tmp, raw = prepared
    t0 = read_checkpoint(_train(tmp, raw, "pf/t0"))
    pf = _variant(raw, "train", partial_freeze=1)
    t1 = read_checkpoint(_train(tmp, pf, "pf/t1", task="t1", prev="../pf/t0"))
    first = [k for k in t0["state_dict"] if ".couplings.0." in k]
    later = [k for k in t0["state_dict"] if ".couplings.1." in k and k.endswith("weight")]
    assert first and later
    assert all(torch.equal(t0["state_dict"][k], t1["state_dict"][k]) for k in first)
    assert any(not torch.equal(t0["state_dict"][k], t1["state_dict"][k]) for k in later)


def test_feature_norm_stats_are_fixed_on_task_0(prepared) -> None:
    tmp, raw = prepared
    fn = _variant(raw, "flow", feature_norm=True, class_norm=False)
    init_model(parse_params(fn), tmp / "features", tmp / "fn/init")
    t0 = read_checkpoint(_train(tmp, fn, "fn/t0", prev="../fn/init"))
    mean0 = t0["state_dict"]["feat_mean_0"]
    assert mean0.abs().sum() > 0 and not torch.equal(t0["state_dict"]["feat_std_0"],
                                                     torch.ones_like(mean0))
    fit, _ = calibration_split(5, fn["eval"]["calib_fraction"], fn["seed"])
    feats = [load_split(tmp / "features", c, "train").subset(fit).features[0] for c in "ab"]
    direct = torch.cat([f.float().flatten(2).transpose(1, 2) for f in feats]).reshape(-1, 40)
    torch.testing.assert_close(mean0, direct.mean(0))
    t1 = read_checkpoint(_train(tmp, fn, "fn/t1", task="t1", prev="../fn/t0"))
    assert torch.equal(t1["state_dict"]["feat_mean_0"], mean0)  # never re-estimated


def test_schedule_meta_and_sub_epochs() -> None:
    from ccnf.models.ccnf import Schedule

    raw = tiny_params(Path("/nonexistent"), [["a"], ["b"]])
    raw["train"].update(meta_epochs=3, sub_epochs=1, first_task_reg_scale=0.1, epochs=2,
                        images_per_step=4, lr_schedule="constant", lr_warmup_steps=0)
    params = parse_params(raw)
    # 16 images in batches of 4: 4 steps per epoch, 2 epochs = 8 steps per round
    s0, s1 = Schedule.for_task(params, 0, 16, 1), Schedule.for_task(params, 1, 16, 1)
    assert (s0.rounds, s1.rounds) == (3, 1)
    assert (s0.budget.steps_per_epoch, s0.budget.steps, s0.total_steps) == (4, 8, 24)
    assert s0.reg_factor(0) == pytest.approx(0.1) and s0.reg_factor(4) == 0.0
    assert s1.reg_factor(3) == 1.0 and s1.reg_factor(4) == 0.0
    tc = params.train
    assert s0.lr_factor(0, tc) == pytest.approx(0.25) and s0.lr_factor(4, tc) == 1.0
    assert s1.lr_factor(0, tc) == 1.0


def test_step_budget_floor_and_cosine_schedule() -> None:
    from ccnf.schedule import StepBudget, lr_factor

    raw = tiny_params(Path("/nonexistent"), [["a"], ["b"]])
    raw["train"].update(epochs=8, images_per_step=8, min_steps_per_class=50,
                        lr_schedule="cosine", lr_warmup_steps=10)
    tc = parse_params(raw).train
    # 8 images of one class: 1 step per epoch, 8 epochs -> the floor decides
    assert StepBudget.of(8, 1, tc).steps == 50
    assert StepBudget.of(8, 3, tc).steps == 150  # per class learned
    assert StepBudget.of(800, 1, tc).steps == 8 * 100  # epochs decide when they give more
    assert lr_factor(0, 100, tc) == pytest.approx(0.1 * 1.0)  # warm-up x cos(0)
    assert lr_factor(50, 100, tc) == pytest.approx(0.5)
    assert lr_factor(99, 100, tc) < 0.01
    off = tc.model_copy(update={"min_steps_per_class": 0, "lr_schedule": "constant",
                                "lr_warmup_steps": 0})
    assert StepBudget.of(8, 3, off).steps == 8 and lr_factor(7, 8, off) == 1.0


def test_class_norm_stats_are_each_class_own_and_fixed(prepared) -> None:
    """flow.class_norm_mean: channel: one mean and std per channel of each class's fit
    images; fixed by later tasks (the position mean: the test below)."""
    tmp, raw = prepared
    cn = _variant(raw, "flow", class_norm=True, class_norm_mean="channel")
    init_model(parse_params(cn), tmp / "features", tmp / "cn/init")
    t0 = read_checkpoint(_train(tmp, cn, "cn/t0", prev="../cn/init"))
    fit, _ = calibration_split(5, cn["eval"]["calib_fraction"], cn["seed"])
    for cid, cls in enumerate("ab"):
        f = load_split(tmp / "features", cls, "train").subset(fit).features[1].float()
        flat = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])
        torch.testing.assert_close(t0["state_dict"]["class_mean_1"][cid], flat.mean(0))
        torch.testing.assert_close(t0["state_dict"]["class_std_1"][cid], flat.std(0))
    t1 = read_checkpoint(_train(tmp, cn, "cn/t1", task="t1", prev="../cn/t0"))
    for key in ("class_mean_0", "class_std_1"):
        assert torch.equal(t1["state_dict"][key][:2], t0["state_dict"][key])
        assert not torch.equal(t1["state_dict"][key][2:3], t0["state_dict"][key][:1])


def test_positional_class_mean_is_each_class_own_mean_map(prepared) -> None:
    """flow.class_norm_mean: position: the class's mean over its fit images at every position,
    and the std of the deviations from that map; fixed by later tasks."""
    tmp, raw = prepared
    cn = _variant(raw, "flow", class_norm=True, class_norm_mean="position")
    init_model(parse_params(cn), tmp / "features", tmp / "pm/init")
    t0 = read_checkpoint(_train(tmp, cn, "pm/t0", prev="../pm/init"))
    fit, _ = calibration_split(5, cn["eval"]["calib_fraction"], cn["seed"])
    for cid, cls in enumerate("ab"):
        f = load_split(tmp / "features", cls, "train").subset(fit).features[1].float()
        maps = f.flatten(2).transpose(1, 2)
        torch.testing.assert_close(t0["state_dict"]["class_mean_1"][cid], maps.mean(0))
        dev = (maps - maps.mean(0)).reshape(-1, f.shape[1])
        torch.testing.assert_close(t0["state_dict"]["class_std_1"][cid], dev.std(0))
    t1 = read_checkpoint(_train(tmp, cn, "pm/t1", task="t1", prev="../pm/t0"))
    assert torch.equal(t1["state_dict"]["class_mean_0"][:2], t0["state_dict"]["class_mean_0"])


@pytest.mark.parametrize(("form", "keys"), [
    ({"class_mean_rank": 1}, ("class_mean_0", "class_mean_basis_0", "class_mean_loading_1")),
    ({"class_mean_bits": 4}, ("class_mean_0", "class_mean_low_1", "class_mean_step_0",
                              "class_mean_codes_1")),
])
def test_compact_class_mean_keeps_its_form_and_the_std_of_what_it_subtracts(
    prepared, form, keys
) -> None:
    """flow.class_mean_rank / class_mean_bits: the std is that of the deviations from the
    compact map the flow subtracts (not from the whole map), and later tasks leave its
    tensors bit-identical."""
    tmp, raw = prepared
    cn = _variant(raw, "flow", class_norm=True, class_norm_mean="position", **form)
    init_model(parse_params(cn), tmp / "features", tmp / "lr/init")
    t0_dir = _train(tmp, cn, "lr/t0", prev="../lr/init")
    t0 = read_checkpoint(t0_dir)
    net = CCNFModel.restore(t0, parse_params(cn), None, torch.device("cpu")).net
    fit, _ = calibration_split(5, cn["eval"]["calib_fraction"], cn["seed"])
    for cid, cls in enumerate("ab"):
        f = load_split(tmp / "features", cls, "train").subset(fit).features[1].float()
        maps = f.flatten(2).transpose(1, 2)
        kept = net.class_mean_map(1, cid)
        assert not torch.allclose(kept, maps.mean(0))  # the compact form is not the map
        dev = (maps - kept).reshape(-1, f.shape[1])
        torch.testing.assert_close(t0["state_dict"]["class_std_1"][cid], dev.std(0))
    t1 = read_checkpoint(_train(tmp, cn, "lr/t1", task="t1", prev="../lr/t0"))
    for key in keys:
        assert torch.equal(t1["state_dict"][key][:2], t0["state_dict"][key]), key


@pytest.mark.parametrize("prototypes", ["fixed", "shared"])
def test_finished_class_prototype_is_unchanged_by_later_tasks(prepared, prototypes) -> None:
    """flow.prototypes: fixed freezes mu_y = P e_y when y's task ends; the shared projection P
    keeps training on later classes, so with 'shared' the old prototype drifts."""
    from ccnf.flows.ccnf import CCNF

    tmp, raw = prepared
    var = _variant(raw, "flow", prototypes=prototypes)
    var = _variant(var, "loss", lambda_center=1.0)
    params = parse_params(var)
    name = f"proto_{prototypes}"
    init_model(params, tmp / "features", tmp / name / "init")
    ck0 = read_checkpoint(_train(tmp, var, f"{name}/t0", prev=f"../{name}/init"))
    ck1 = read_checkpoint(_train(tmp, var, f"{name}/t1", task="t1", prev=f"../{name}/t0"))
    m0 = CCNF.from_checkpoint(ck0, ccnf_spec(params.flow, ck0["channels"]))
    m1 = CCNF.from_checkpoint(ck1, ccnf_spec(params.flow, ck1["channels"]))
    old = torch.tensor([0, 1])
    for lvl in range(m0.n_levels):
        before, after = m0.prototype(lvl, old).detach(), m1.prototype(lvl, old).detach()
        if prototypes == "fixed":
            assert torch.equal(before, after)
        else:
            assert not torch.allclose(before, after)
    assert not torch.equal(m1.protos[0].weight, m0.protos[0].weight)  # P itself trained on


def test_meta_epochs_multiply_task_0_steps(prepared) -> None:
    tmp, raw = prepared
    base = _train(tmp, raw, "meta1/t0")
    meta = _train(tmp, _variant(raw, "train", meta_epochs=2), "meta2/t0")
    n1 = len((base / "train_log.tsv").read_text().splitlines()) - 1
    n2 = len((meta / "train_log.tsv").read_text().splitlines()) - 1
    assert n2 == 2 * n1


def test_weak_first_task_regularization_changes_training(prepared) -> None:
    tmp, raw = prepared
    weak = _train(tmp, _variant(raw, "train", first_task_reg_scale=0.0), "weak/t0")
    base = read_checkpoint(_train(tmp, raw, "strong/t0"))["state_dict"]
    other = read_checkpoint(weak)["state_dict"]
    assert any(not torch.equal(base[k], other[k]) for k in base if k.startswith("flows."))


def test_every_variant_trains_and_evaluates(prepared) -> None:
    """Each catalog switch runs through train and evaluate on the tiny data."""
    tmp, raw = prepared
    variants = {
        "proto": _variant(raw, "loss", lambda_proto=0.1),
        "mifeat": _variant(raw, "loss", lambda_mi_feat=0.1),
        "dsm": _variant(_variant(raw, "loss", lambda_dsm=0.1, dsm_samples=8), "flow",
                        noise_dim=4),
        "e10": _variant(_variant(raw, "loss", center_detach=False), "flow",
                        prior="class_mixture"),
        "uncond": _variant(raw, "flow", class_conditioning=False),
    }
    for name, var in variants.items():
        params = parse_params(var)
        init_model(params, tmp / "features", tmp / name / "init")
        _train(tmp, var, f"{name}/t0", prev=f"../{name}/init")
        res = evaluate_task(params, "t0", tmp / "features", tmp / name / "t0",
                            tmp / name / "m.json", tmp / name / "eval")
        assert set(res["per_class"]) == {"a", "b"}, name


@pytest.mark.parametrize("kind", ["gaussian", "flow_bank", "fastflow"])
def test_baseline_banks_run_through_train_and_evaluate(prepared, kind: str) -> None:
    tmp, raw = prepared
    var = _variant(_variant(raw, "model", kind=kind), "score", class_select="likelihood")
    params = parse_params(var)
    init_model(params, tmp / "features", tmp / kind / "init")
    _train(tmp, var, f"{kind}/t0", prev=f"../{kind}/init")
    t0 = read_checkpoint(tmp / kind / "t0")
    _train(tmp, var, f"{kind}/t1", task="t1", prev=f"../{kind}/t0")
    t1 = read_checkpoint(tmp / kind / "t1")
    assert t1["kind"] == kind and t1["classes"] == ["a", "b", "c", "d"]
    for k, v in t0["state_dicts"]["a"].items():  # no forgetting by construction
        assert torch.equal(v, t1["state_dicts"]["a"][k]), k
    res = evaluate_task(params, "t1", tmp / "features", tmp / kind / "t1",
                        tmp / kind / "m.json", tmp / kind / "eval")
    assert set(res["per_class"]["a"]) == {"task", "nf", "latent"}  # no prototype scores
    assert res["agnostic"]["same_as_aware"] is False
    assert set(res["agnostic"]["selection_accuracy_by_method"]) == {"likelihood"}
    with pytest.raises(CcnfError, match=r"model\.kind"):
        evaluate_task(parse_params(raw), "t1", tmp / "features", tmp / kind / "t1",
                      tmp / kind / "m2.json", tmp / kind / "eval2")
