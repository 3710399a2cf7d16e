"""The continual strategies of issue 13: parameter isolation (adapters) and generative replay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_mvtec_root, tiny_params

from ccnf.config import parse_params
from ccnf.data.manifest import index_root
from ccnf.errors import CcnfError
from ccnf.features import extract_features, load_split
from ccnf.flows.adapters import AdapterRoute, LowRankAdapters
from ccnf.flows.ccnf import CCNF, CCNFSpec
from ccnf.models import read_checkpoint
from ccnf.models.ccnf import ccnf_spec, generate_task_data
from ccnf.models.ccnf_scores import patch_scores
from ccnf.train import init_model, train_task


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory) -> tuple[Path, dict]:
    """Three one-class tasks on tiny images, features cached, models/init written."""
    tmp = tmp_path_factory.mktemp("strategies")
    root = make_mvtec_root(tmp / "ds", ["a", "b", "c"], n_train=5)
    raw = tiny_params(root, [["a"], ["b"], ["c"]])
    params = parse_params(raw)
    extract_features(index_root(root, params.classes, progress=False), params, tmp / "features")
    init_model(params, tmp / "features", tmp / "models" / "init")
    return tmp, raw


def _with(raw: dict, section: str, **values: object) -> dict:
    return {**raw, section: {**raw[section], **values}}


def _chain(tmp: Path, raw: dict, name: str, tasks: int = 3, init: Path | None = None
           ) -> list[dict]:
    params = parse_params(raw)
    prev = init or tmp / "models" / "init"
    out = []
    for t in range(tasks):
        train_task(params, f"t{t}", tmp / "features", prev, tmp / name / f"t{t}")
        prev = tmp / name / f"t{t}"
        out.append(read_checkpoint(prev))
    return out


def _net(ckpt: dict, raw: dict) -> CCNF:
    return CCNF.from_checkpoint(ckpt, ccnf_spec(parse_params(raw).flow, ckpt["channels"])).eval()


@pytest.mark.parametrize(("film_rank", "mean_condition", "stacked"),
                         [(0, 0, False), (2, 0, False), (0, 4, False), (2, 0, True)])
def test_adapters_keep_the_base_and_earlier_adapters_bit_identical(
    three_tasks, film_rank: int, mean_condition: int, stacked: bool
) -> None:
    tmp, raw = three_tasks
    raw = _with(raw, "train", strategy="adapters", adapter_rank=2, adapter_film_rank=film_rank,
                adapter_stack=stacked)
    raw = _with(raw, "flow", mean_condition_dim=mean_condition)
    init = None
    if mean_condition:  # another flow layout: its own init
        init = tmp / f"init-mc{mean_condition}"
        init_model(parse_params(raw), tmp / "features", init)
    t0, t1, t2 = _chain(
        tmp, raw, f"adapters-film{film_rank}-mc{mean_condition}-s{stacked:d}", init=init)
    film = {"film_rank": film_rank} if film_rank else {}
    stack = {"stacked": True} if stacked else {}
    layout = {"rank": 2, **film, "storage": "float16", **stack}  # params.yaml's storage
    assert "adapters" not in t0 and t1["adapters"] == {"count": 1, **layout}
    assert t2["adapters"] == {"count": 2, **layout}
    assert any(".lora_film." in k for k in t2["state_dict"]) == bool(film_rank)
    lora = [k for k in t2["state_dict"] if ".lora_" in k]
    assert {t2["state_dict"][k].dtype for k in lora} == {torch.float16}
    assert t2["state_dict"]["class_adapter"].tolist() == [-1, 0, 1]
    # the shared flow and, with the mean-content condition, its maps A_l
    base = [k for k in t0["state_dict"] if k.startswith(("flows.", "mean_projs."))]
    assert any(k.startswith("mean_projs.") for k in base) == bool(mean_condition)
    for later in (t1, t2):
        for k in base:  # the shared flow, spectral-norm buffers included
            assert torch.equal(t0["state_dict"][k], later["state_dict"][k]), k
    first_adapter = [k for k in t1["state_dict"] if ".lora_" in k]
    assert first_adapter and all(k.endswith(".0") for k in first_adapter)
    for k in first_adapter:
        assert torch.equal(t1["state_dict"][k], t2["state_dict"][k]), k
    assert torch.equal(t1["state_dict"]["embedding"][:2], t2["state_dict"]["embedding"][:2])
    # the adapter learned: its B factors left zero
    assert any(k.split(".")[-2] == "b" and t1["state_dict"][k].abs().sum() > 0
               for k in first_adapter)
    # hence the earlier classes' scores do not move at all
    params = parse_params(raw)
    feats = load_split(tmp / "features", "b", "test").features
    ids = torch.ones(feats[0].shape[0], dtype=torch.long)
    before = patch_scores(_net(t1, raw), feats, ids, 4)
    after = patch_scores(_net(t2, raw), feats, ids, 4)
    for name, levels in before.levels.items():
        for lvl_b, lvl_a in zip(levels, after.levels[name], strict=True):
            assert torch.equal(lvl_b, lvl_a), name
    assert params.train.strategy == "adapters"


def test_class_adapters_give_each_class_its_own_and_later_tasks_leave_them(three_tasks) -> None:
    """flow.class_adapter_rank: a class's adapter is made and learned with its task; the
    shared flow goes on learning (naive), the adapter of an earlier class does not move."""
    tmp, raw = three_tasks
    raw = _with(raw, "flow", class_adapter_rank=2)
    t0, t1, t2 = _chain(tmp, raw, "class-adapters")
    assert [c["state_dict"]["class_adapter"].tolist() for c in (t0, t1, t2)] == [
        [0], [0, 1], [0, 1, 2]]
    assert t2["adapters"] == {"count": 3, "rank": 2, "storage": "float16"}
    first = [k for k in t0["state_dict"] if ".lora_" in k]
    assert first and all(k.endswith(".0") for k in first)
    assert any(k.split(".")[-2] == "b" and t0["state_dict"][k].abs().sum() > 0 for k in first)
    for k in first:
        assert torch.equal(t0["state_dict"][k], t2["state_dict"][k]), k
    shared = [k for k in t0["state_dict"] if k.startswith("flows.") and ".lora_" not in k
              and k.endswith("weight")]
    assert any(not torch.equal(t0["state_dict"][k], t2["state_dict"][k]) for k in shared)


def test_class_adapters_and_the_adapters_strategy_are_refused_together(three_tasks) -> None:
    _, raw = three_tasks
    raw = _with(_with(raw, "flow", class_adapter_rank=2), "train", strategy="adapters")
    with pytest.raises(CcnfError, match=r"flow\.class_adapter_rank"):
        parse_params(raw)


def test_adapter_routing_per_vector_matches_per_adapter_passes() -> None:
    torch.manual_seed(0)
    lora = LowRankAdapters(6, 5, rank=2, count=3)
    for b in lora.b:
        torch.nn.init.normal_(b)
    x = torch.randn(10, 6)
    index = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1, 0])
    for exact in (False, True):  # one stacked pass (training batches), or one per adapter
        delta = lora(x, AdapterRoute.of(index, exact=exact))
        for k in (-1, 0, 1, 2):
            rows = index == k
            expected = (torch.zeros(int(rows.sum()), 5) if k < 0
                        else (x[rows] @ lora.a[k].t()) @ lora.b[k].t())
            assert torch.allclose(delta[rows], expected, atol=1e-6), (exact, k)
    same = torch.full((10,), 1)
    assert torch.allclose(lora(x, same), (x @ lora.a[1].t()) @ lora.b[1].t())


def test_stacked_adapter_k_adds_the_pairs_of_adapters_0_to_k() -> None:
    """train.adapter_stack: adapter k's delta is sum_{j <= k} (x A_j^T) B_j^T, per batch
    and per vector alike; adapter 0's is its own pair's alone."""
    torch.manual_seed(0)
    lora = LowRankAdapters(6, 5, rank=2, count=3, stacked=True)
    for b in lora.b:
        torch.nn.init.normal_(b)
    x = torch.randn(10, 6)
    own = [(x @ a.t()) @ b.t() for a, b in zip(lora.a, lora.b, strict=True)]
    for k in range(3):
        expected = sum(own[: k + 1])
        assert torch.allclose(lora(x, torch.full((10,), k)), expected, atol=1e-6), k
    for index in (torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1, 0]),
                  torch.tensor([1, -1, 1, 1, -1, 1, 1, 1, 1, -1])):  # adapter 0 absent
        for exact in (False, True):  # one masked pass (evaluation batches), or one per adapter
            delta = lora(x, AdapterRoute.of(index, exact=exact))
            for k in (-1, 0, 1, 2):
                rows = index == k
                expected = torch.zeros_like(x[:, :5]) if k < 0 else sum(own[: k + 1])
                assert torch.allclose(delta[rows], expected[rows], atol=1e-6), (exact, k)


def test_stacked_adapters_read_back_stacked_from_their_checkpoint() -> None:
    torch.manual_seed(0)
    spec = CCNFSpec(n_couplings=(2,), hidden_dims=(16,), embedding_dim=4, pos_dim=4)
    nets = {}
    for stacked in (False, True):
        torch.manual_seed(0)
        net = CCNF([6], [[3, 3]], spec, n_classes=3).eval()
        net.add_adapter(2, [1], stacked=stacked)
        net.add_adapter(2, [2], stacked=stacked)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if ".lora_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        nets[stacked] = net
    x, pos = torch.randn(9, 6), torch.arange(9)
    with torch.no_grad():
        logp = {s: n.forward_level(0, x, torch.full((9,), 2), pos).log_prob
                for s, n in nets.items()}
        back = CCNF.from_checkpoint(nets[True].checkpoint(), spec).eval()
        assert back.adapters_stacked
        assert torch.equal(back.forward_level(0, x, torch.full((9,), 2), pos).log_prob,
                           logp[True])
        # the same tensors, unstacked: task 2's classes lose task 1's change
        assert not torch.allclose(logp[True], logp[False])
        first = {s: n.forward_level(0, x, torch.ones(9, dtype=torch.long), pos).log_prob
                 for s, n in nets.items()}
        assert torch.equal(first[True], first[False])  # adapter 0 is its own pair either way
    with pytest.raises(ValueError, match="stacked True"):
        nets[True].add_adapter(2, [0], stacked=False)


def test_stacking_adapters_needs_the_adapters_strategy(three_tasks) -> None:
    _, raw = three_tasks
    with pytest.raises(CcnfError, match=r"train\.adapter_stack"):
        parse_params(_with(raw, "train", adapter_stack=True))


def test_inverse_level_undoes_forward_level() -> None:
    torch.manual_seed(0)
    spec = CCNFSpec(n_couplings=(3,), hidden_dims=(16,), embedding_dim=4, pos_dim=4)
    net = CCNF([6], [[3, 3]], spec, n_classes=2).eval()
    net.global_step.fill_(100)  # past the additive warm-up: the affine couplings
    net.add_adapter(2, [1], film_rank=2)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    net.set_class_stats(0, 1, torch.randn(6), torch.rand(6) + 0.5)
    x = torch.randn(9, 6)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1, 0])
    pos = torch.arange(9)
    with torch.no_grad():
        z = net.forward_level(0, x, y, pos).z
    assert torch.allclose(net.inverse_level(0, z, y, pos), x, atol=1e-4)


def test_generated_features_follow_the_model(three_tasks) -> None:
    """Generated maps have the cached layout, their targets are the model's own log p, and
    the same seed gives the same features."""
    tmp, raw = three_tasks
    (t0,) = _chain(tmp, raw, "gen_base", tasks=1)
    net = _net(t0, raw)
    data = generate_task_data(net, [0], 3, 0.8, torch.Generator().manual_seed(1))
    again = generate_task_data(net, [0], 3, 0.8, torch.Generator().manual_seed(1))
    assert data.labels.tolist() == [0, 0, 0]
    for lvl, f in enumerate(data.feats):
        hw = net.positions(lvl).shape[0]
        assert f.shape == (3, hw, net.channels[lvl]) and torch.isfinite(f).all()
        assert torch.equal(f, again.feats[lvl])
        y = torch.zeros(3 * hw, dtype=torch.long)
        pos = torch.arange(hw).repeat(3)
        with torch.no_grad():
            logp = net.forward_level(lvl, f.reshape(-1, f.shape[-1]), y, pos).log_prob
        assert torch.allclose(logp.reshape(3, hw), data.target[lvl][..., 0])


def test_latent_distillation_targets_are_the_generating_latents(three_tasks) -> None:
    """loss.distill_target latent: the target of a generated vector is the z it came from, so
    L_distill is 0 for the model that generated it and grows as the map moves; real images in
    the same batch do not count."""
    from ccnf.losses import distill_loss

    tmp, raw = three_tasks
    (t0,) = _chain(tmp, raw, "gen_base", tasks=1)
    net = _net(t0, raw)
    data = generate_task_data(net, [0], 2, 0.8, torch.Generator().manual_seed(1),
                              targets="latent")
    same = generate_task_data(net, [0], 2, 0.8, torch.Generator().manual_seed(1), targets=None)
    assert same.target is None and all(
        torch.equal(a, b) for a, b in zip(data.feats, same.feats, strict=True))
    real = generate_task_data(net, [0], 1, 0.8, torch.Generator().manual_seed(2), targets=None)
    both = real + data  # the "real" image first: NaN targets
    for lvl in range(net.n_levels):
        dim = net.channels[lvl]
        assert both.target[lvl].shape == (3, net.positions(lvl).shape[0], dim)
        assert torch.isnan(both.target[lvl][0]).all() and torch.isfinite(both.target[lvl][1:]).all()
        x = both.feats[lvl].reshape(-1, dim)
        hw = net.positions(lvl).shape[0]
        y, pos = torch.zeros(3 * hw, dtype=torch.long), torch.arange(hw).repeat(3)
        target = both.target[lvl].reshape(-1, dim)
        with torch.no_grad():
            out = net.forward_level(lvl, x, y, pos)
            assert float(distill_loss(out, target, dim)) < 1e-6
            moved = net.forward_level(lvl, x * 1.1, y, pos)
            gen = slice(hw, None)
            direct = (moved.z[gen] - target[gen]).pow(2).sum(dim=-1).mean() / dim
            assert float(distill_loss(moved, target, dim)) == pytest.approx(float(direct))
            assert float(direct) > 1e-3


def test_generative_replay_trains_on_generated_features_and_stores_none(three_tasks) -> None:
    tmp, raw = three_tasks
    gen = _with(_with(raw, "train", strategy="generative_replay", generated_per_class=4),
                "loss", lambda_distill=1.0)
    naive = _chain(tmp, raw, "naive_chain")
    replay = _chain(tmp, gen, "gen_chain")
    # task 0 has nothing to replay: the same model
    for k, v in naive[0]["state_dict"].items():
        assert torch.equal(v, replay[0]["state_dict"][k]), k
    for n_ck, g_ck in zip(naive[1:], replay[1:], strict=True):
        # the same keys and shapes as the naive model: nothing of earlier classes is kept
        assert g_ck.keys() == n_ck.keys()
        assert g_ck["replay"] == {}
        assert {k: v.shape for k, v in g_ck["state_dict"].items()} == {
            k: v.shape for k, v in n_ck["state_dict"].items()}
        assert any(not torch.equal(v, g_ck["state_dict"][k])
                   for k, v in n_ck["state_dict"].items())
    header, *rows = (tmp / "gen_chain/t1/train_log.tsv").read_text().splitlines()
    col = header.split("\t").index("L_distill")
    assert all(float(r.split("\t")[col]) >= 0 for r in rows)
    assert "L_distill" not in (tmp / "naive_chain/t1/train_log.tsv").read_text()


def test_generative_replay_apart_trains_a_naive_tasks_steps(three_tasks) -> None:
    """train.generated_per_step: the budget counts the real images only, so task 1 takes as
    many steps as under naive training (mixed in, the 4 generated maps lengthen the task)."""
    tmp, raw = three_tasks
    gen = _with(raw, "train", strategy="generative_replay", generated_per_class=40,
                generated_per_step=2, min_steps_per_class=0)
    mixed = _with(gen, "train", generated_per_step=None)
    _chain(tmp, _with(raw, "train", min_steps_per_class=0), "naive_budget", tasks=2)
    _chain(tmp, gen, "apart_budget", tasks=2)
    _chain(tmp, mixed, "mixed_budget", tasks=2)

    def steps(name: str) -> int:
        return len((tmp / name / "t1/train_log.tsv").read_text().splitlines()) - 1

    assert steps("apart_budget") == steps("naive_budget") < steps("mixed_budget")


def test_batch_draw_mixes_by_default_and_keeps_the_real_budget_apart() -> None:
    """train.generated_per_step: the real images keep a naive task's epochs and budget, each
    step adds G generated ones; null (default) draws exactly what one mixed pool did."""
    from ccnf.models.ccnf import _BatchDraw

    tc = parse_params(tiny_params(Path("."), [["a"]])).train
    mixed = _BatchDraw(10, 30, tc.model_copy(update={"images_per_step": 4}))
    assert mixed.n_budget == 30
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    order = torch.randperm(30, generator=gen_b)
    assert torch.equal(mixed.images(0, 8, gen_a), order[:4])
    assert torch.equal(mixed.images(1, 8, gen_a), order[4:8])

    apart = _BatchDraw(10, 30, tc.model_copy(
        update={"images_per_step": 4, "generated_per_step": 7}))
    assert apart.n_budget == 10
    gen = torch.Generator().manual_seed(0)
    steps = [apart.images(i % 3, 3, gen) for i in range(6)]  # two epochs of ceil(10 / 4) steps
    real = [s[s < 10] for s in steps]
    generated = torch.cat([s[s >= 10] for s in steps])
    assert [r.numel() for r in real] == [4, 4, 2] * 2
    assert [int((s >= 10).sum()) for s in steps] == [7] * 6
    assert sorted(torch.cat(real[:3]).tolist()) == list(range(10))  # each real image once
    # generated images cycle: all 20 before any repeats
    assert sorted(generated[:20].tolist()) == list(range(10, 30))
    # no generated images (task 0): the option changes nothing
    alone = _BatchDraw(10, 10, tc.model_copy(update={"images_per_step": 4,
                                                     "generated_per_step": 7}))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(alone.images(0, 3, gen_a), torch.randperm(10, generator=gen_b)[:4])


def test_batch_draw_keeps_each_earlier_class_its_share() -> None:
    """train.generated_per_step_per_class = k: a step draws max(G, k x earlier classes)
    generated maps; without it G alone whatever the number of earlier classes."""
    from ccnf.models.ccnf import _BatchDraw

    tc = parse_params(tiny_params(Path("."), [["a"]])).train.model_copy(
        update={"images_per_step": 4, "generated_per_step": 6})
    scaled = tc.model_copy(update={"generated_per_step_per_class": 2})

    def generated(t, n_earlier: int) -> int:
        step = _BatchDraw(10, 60, t, n_earlier=n_earlier).images(
            0, 3, torch.Generator().manual_seed(0))
        return int((step >= 10).sum())

    assert [generated(scaled, n) for n in (1, 3, 4, 11)] == [6, 6, 8, 22]
    assert [generated(tc, n) for n in (1, 11)] == [6, 6]
    # more than the pool holds: the permutation renews, every map drawn before any repeats
    step = _BatchDraw(10, 20, scaled, n_earlier=11).images(0, 3, torch.Generator().manual_seed(1))
    gen = step[step >= 10].tolist()
    assert len(gen) == 22 and sorted(gen[:10]) == list(range(10, 20))


def test_per_class_share_needs_generated_per_step() -> None:
    raw = tiny_params(Path("."), [["a"]])
    raw["train"].update(strategy="generative_replay", generated_per_step_per_class=4)
    with pytest.raises(CcnfError, match=r"train\.generated_per_step is null"):
        parse_params(raw)


def test_replay_quality_compares_a_floor_on_generated_and_real_features(three_tasks) -> None:
    from ccnf.bench.replay_quality import moment_gap, replay_quality

    same = torch.randn(6, 3, 2, 2)
    assert moment_gap(same, same) == {"mean_gap_in_std": 0.0, "std_ratio": 1.0}
    assert moment_gap(same, same + same.std(dim=0))["mean_gap_in_std"] == pytest.approx(1.0)
    tmp, raw = three_tasks
    _chain(tmp, raw, "quality", tasks=1)
    rows = replay_quality(parse_params(raw), raw, tmp / "quality/t0", tmp / "features", None,
                          4, [0.5, 1.0])
    assert [(r["class"], r["source"]) for r in rows] == [
        ("a", "real"), ("a", "tau 0.5"), ("a", "tau 1.0")]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("image_auroc", "pixel_auroc"))
    assert rows[1]["images"] == 4 and "level0_std_ratio" in rows[1]


def test_float16_adapters_score_exactly_as_their_checkpoint() -> None:
    """train.adapter_storage float16: after rounding, the model in memory (which calibrates)
    and the one read back from its checkpoint give the same log p, bit for bit."""
    torch.manual_seed(0)
    spec = CCNFSpec(n_couplings=(2,), hidden_dims=(16,), embedding_dim=4, pos_dim=4)
    net = CCNF([6], [[3, 3]], spec, n_classes=2).eval()
    net.add_adapter(2, [1], film_rank=1, storage="float16")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    x, y, pos = torch.randn(9, 6), torch.ones(9, dtype=torch.long), torch.arange(9)
    unrounded = net.forward_level(0, x, y, pos).log_prob
    net.round_adapters()
    ckpt = net.checkpoint()
    assert ckpt["adapters"]["storage"] == "float16"
    back = CCNF.from_checkpoint(ckpt, spec).eval()
    with torch.no_grad():
        rounded = net.forward_level(0, x, y, pos).log_prob
        assert torch.equal(back.forward_level(0, x, y, pos).log_prob, rounded)
    assert not torch.equal(rounded, unrounded)  # rounding did change the weights
    with pytest.raises(ValueError, match="cannot add rank 2"):
        net.add_adapter(2, [0], film_rank=1, storage="float32")


def test_adapters_are_made_on_the_device_of_their_flow() -> None:
    """The first adapter of a flow on a GPU went to the CPU (an empty ParameterList follows no
    .to()), so adapters crashed at task 1 on CUDA. The meta device stands in for the GPU."""
    empty_then_moved = LowRankAdapters(6, 5, rank=2).to("meta")
    empty_then_moved.add()
    assert {p.device.type for p in empty_then_moved.parameters()} == {"meta"}
    spec = CCNFSpec(n_couplings=(2,), hidden_dims=(16,), embedding_dim=4, pos_dim=4)
    net = CCNF([6], [[3, 3]], spec, n_classes=2).to("meta")
    new = net.add_adapter(2, [1], film_rank=2)
    assert new and {p.device.type for p in new} == {"meta"}
    assert "anchor" not in "".join(net.state_dict())  # no new checkpoint key
