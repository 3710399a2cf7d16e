from __future__ import annotations

import math

import pytest
import torch

from ccnf.config import FlowConfig
from ccnf.flows import (
    CCNF,
    ConditionalAffineCoupling,
    ConditionalFlow,
    SNLinear,
    positional_encoding_2d,
)
from ccnf.models.ccnf import ccnf_spec


def _jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each row of x, by autograd (x: (N, D))."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], row)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("dim", [2, 5, 8])
@pytest.mark.parametrize("warm", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("spectral_norm", [True, False])
def test_coupling_logdet_matches_autograd_and_inverts(dim, warm, spectral_norm) -> None:
    torch.manual_seed(dim)
    c = ConditionalAffineCoupling(dim, 3, 16, clamp_alpha=1.5, spectral_norm=spectral_norm)
    c = c.double().eval()
    x = torch.randn(4, dim, dtype=torch.double) * 2
    cond = torch.randn(4, 3, dtype=torch.double)
    y, logdet, s = c(x, cond, warm)
    expected = torch.stack(
        [_jacobian_logdet(lambda v, i=i: c(v, cond[i : i + 1], warm)[0], x[i : i + 1])[0]
         for i in range(4)]
    )
    torch.testing.assert_close(logdet, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(c.inverse(y, cond, warm), x, atol=1e-10, rtol=1e-10)
    assert s.abs().max() <= 1.5 * warm + 1e-12  # soft clamp bounds the log-scale
    if warm == 0.0:
        assert torch.all(logdet == 0)  # additive start: volume preserving


def test_flow_logdet_matches_autograd_and_inverts() -> None:
    torch.manual_seed(0)
    f = ConditionalFlow(7, 4, n_couplings=4, hidden_dim=12, clamp_alpha=1.9, spectral_norm=True)
    f = f.double().eval()
    x = torch.randn(3, 7, dtype=torch.double)
    cond = torch.randn(3, 4, dtype=torch.double)
    z, logdet, scale_sq = f(x, cond)
    for i in range(3):
        want = _jacobian_logdet(lambda v, i=i: f(v, cond[i : i + 1])[0], x[i : i + 1])[0]
        torch.testing.assert_close(logdet[i], want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(f.inverse(z, cond), x, atol=1e-10, rtol=1e-10)
    assert scale_sq.shape == (3,) and torch.all(scale_sq >= 0)


def test_log_prob_is_a_normalized_density_in_2d() -> None:
    """Integrate exp(log p(x|y)) over a grid: a density must integrate to ~1."""
    torch.manual_seed(1)
    cfg = FlowConfig(n_couplings=3, hidden_dim=8, embedding_dim=2, pos_dim=0, warmup_steps=0)
    model = CCNF([2], [[1, 1]], ccnf_spec(cfg, [2]), n_classes=1).double().eval()
    with torch.no_grad():
        for p in model.flows.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a visibly non-Gaussian density
    g = torch.linspace(-20, 20, 1201, dtype=torch.double)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    x = torch.stack([xx.ravel(), yy.ravel()], dim=1)
    n = x.shape[0]
    zeros = torch.zeros(n, dtype=torch.long)
    out = model.forward_level(0, x, zeros, zeros)
    step = (g[1] - g[0]) ** 2
    assert float(out.log_prob.detach().exp().sum() * step) == pytest.approx(1.0, abs=2e-3)


def test_spectral_norm_normalizes_weight_and_switches_off() -> None:
    torch.manual_seed(0)
    layer = SNLinear(6, 5)
    layer.train()
    for _ in range(50):
        layer(torch.randn(2, 6))
    sigma = torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2)
    assert float(sigma) == pytest.approx(1.0, abs=1e-4)
    layer.enabled.fill_(False)
    torch.testing.assert_close(layer.effective_weight(), layer.weight)


def test_positional_encoding_shape_and_uniqueness() -> None:
    pe = positional_encoding_2d(16, 5, 7)
    assert pe.shape == (35, 16)
    assert torch.unique(pe, dim=0).shape[0] == 35
    # first half depends on the column only, second half on the row only
    grid = pe.view(5, 7, 16)
    torch.testing.assert_close(grid[0, :, :8], grid[4, :, :8])
    torch.testing.assert_close(grid[:, 0, 8:], grid[:, 6, 8:])
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 2, 2)


def test_embedding_grows_keeping_old_rows_and_checkpoint_roundtrip() -> None:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4)
    model = CCNF([6, 10], [[4, 4], [2, 2]], ccnf_spec(cfg, [6, 10]), n_classes=2)
    before = model.embedding.detach().clone()
    model.add_classes(3)
    assert model.n_classes == 5
    torch.testing.assert_close(model.embedding[:2].detach(), before)
    again = CCNF.from_checkpoint(model.checkpoint(classes=list("abcde")), model.cfg)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_warmup_factor_ramps_to_one() -> None:
    cfg = FlowConfig(warmup_steps=10, n_couplings=1, hidden_dim=4, embedding_dim=2, pos_dim=4)
    model = CCNF([4], [[2, 2]], ccnf_spec(cfg, [4]))
    assert model.warm() == 0.0
    model.global_step.fill_(5)
    assert model.warm() == 0.5
    model.global_step.fill_(50)
    assert model.warm() == 1.0


@pytest.mark.parametrize("dim", [3, 8, 112])
def test_every_dimension_is_transformed_within_two_couplings(dim) -> None:
    torch.manual_seed(0)
    f = ConditionalFlow(dim, 2, n_couplings=2, hidden_dim=4, clamp_alpha=1.0, spectral_norm=False)
    dim_a = dim // 2
    # positions (in the input) that the first or second coupling transforms
    first = set(range(dim_a, dim))
    second = {int(f.perms[0][i]) for i in range(dim_a, dim)}
    assert first | second == set(range(dim))


def test_spectral_norm_weight_cached_at_inference_follows_every_change() -> None:
    """The inference cache of W / sigma(W) must never serve a stale weight."""
    torch.manual_seed(0)
    layer = SNLinear(6, 5)
    x = torch.randn(4, 6)

    def fresh() -> torch.Tensor:  # the uncached computation, same ops
        return torch.nn.functional.linear(x, layer.weight / layer.sigma(), layer.bias)

    layer.eval()
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, fresh()) and torch.equal(layer(x), first)
        layer.weight.add_(torch.randn(5, 6))  # an in-place write, as an optimizer step does
        # (not a rescaling: W / sigma(W) does not change under one)
        assert torch.equal(layer(x), fresh()) and not torch.equal(layer(x), first)
        other = SNLinear(6, 5)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), fresh())
        layer.enabled.fill_(False)  # spectral norm switched off
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.train()
    out = layer(x)  # training: recomputed with autograd, power iteration included
    assert out.requires_grad


@pytest.mark.parametrize("absorb", [True, False])
def test_spectral_norm_switch_absorbs_the_norm_without_a_jump(absorb: bool) -> None:
    """Switching spectral norm on at task 1 (SN off on task 0) with ``absorb`` keeps every
    layer's effective weight, hence log p, as it was; without it W jumps to W / sigma(W)."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=3, hidden_dim=16, embedding_dim=4, pos_dim=4, warmup_steps=0)
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=2)
    model.set_spectral_norm(False)
    with torch.no_grad():  # task 0 trained the raw weights far from norm 1
        for m in model.modules():
            if isinstance(m, SNLinear):
                m.weight.mul_(3.0)
    model.eval()
    x, y, pos = torch.randn(20, 6), torch.randint(0, 2, (20,)), torch.randint(0, 9, (20,))
    before = model.forward_level(0, x, y, pos).log_prob.detach()
    model.set_spectral_norm(True, absorb=absorb)
    after = model.forward_level(0, x, y, pos).log_prob.detach()
    if absorb:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        model.train()  # the first training forward (power iteration) keeps it too
        torch.testing.assert_close(model.forward_level(0, x, y, pos).log_prob.detach(), before,
                                   rtol=1e-5, atol=1e-5)
    else:
        assert (after - before).abs().max() > 0.1
    for m in model.modules():
        if isinstance(m, SNLinear):
            assert bool(m.enabled)
            sigma = float(torch.linalg.matrix_norm(m.effective_weight().detach(), ord=2))
            assert sigma == pytest.approx(float(m.gain) if absorb else 1.0, rel=1e-4)


def test_film_conditioning_starts_neutral_and_keeps_the_logdet_exact() -> None:
    torch.manual_seed(0)
    c = ConditionalAffineCoupling(5, 3, 12, clamp_alpha=1.5, spectral_norm=False, film_dim=4)
    c = c.double().eval()
    x, cond = torch.randn(4, 5, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    e1, e2 = torch.randn(4, 4, dtype=torch.double), torch.randn(4, 4, dtype=torch.double)
    # FiLM starts at zero: the class does not matter until it is learned
    torch.testing.assert_close(c(x, cond, 1.0, e1)[0], c(x, cond, 1.0, e2)[0])
    with torch.no_grad():
        c.film.weight.normal_()
    y, logdet, _ = c(x, cond, 1.0, e1)
    assert not torch.allclose(y, c(x, cond, 1.0, e2)[0])
    want = torch.stack([
        torch.linalg.slogdet(torch.autograd.functional.jacobian(
            lambda v, i=i: c(v[None], cond[i : i + 1], 1.0, e1[i : i + 1])[0][0], x[i]))[1]
        for i in range(4)
    ])
    torch.testing.assert_close(logdet, want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(c.inverse(y, cond, 1.0, e1), x, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="FiLM"):
        c(x, cond, 1.0, None)


def test_class_norm_is_a_change_of_variables_in_log_p() -> None:
    """With flow.class_norm, log p(x|y) of class y = log p_flow((x - m_y)/s_y) - sum log s_y:
    a density in x (integrates to 1), and each class uses its own statistics."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=0, warmup_steps=0,
                     class_norm=True, class_conditioning=True)
    model = CCNF([2], [[1, 1]], ccnf_spec(cfg, [2]), n_classes=2).double().eval()
    model.set_class_stats(0, 1, torch.tensor([3.0, -2.0]), torch.tensor([2.0, 0.5]))
    g = torch.linspace(-25, 25, 1001, dtype=torch.double)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    x = torch.stack([xx.ravel(), yy.ravel()], dim=1)
    zeros = torch.zeros(x.shape[0], dtype=torch.long)
    for cls in (0, 1):
        out = model.forward_level(0, x, zeros + cls, zeros)
        mass = float(out.log_prob.detach().exp().sum() * (g[1] - g[0]) ** 2)
        assert mass == pytest.approx(1.0, abs=3e-3)
    a = model.forward_level(0, x[:5], zeros[:5] + 1, zeros[:5]).log_prob
    b = model.forward_level(0, x[:5], zeros[:5], zeros[:5]).log_prob
    assert not torch.allclose(a, b)


def test_positional_class_mean_subtracts_the_map_at_each_vectors_position() -> None:
    """flow.class_norm_mean: position: a vector at position p of class y is normalized with
    m_y(p), so it scores as a per-channel model whose mean is m_y(p) (same weights), and the
    inverse puts the map back."""
    torch.manual_seed(0)
    kw = dict(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=4, warmup_steps=0,
              class_norm=True)
    pos_cfg = FlowConfig(**kw, class_norm_mean="position")
    model = CCNF([3], [[2, 2]], ccnf_spec(pos_cfg, [3]), n_classes=2).double().eval()
    maps, std = torch.randn(4, 3, dtype=torch.double) * 3, torch.rand(3).double() + 0.5
    model.set_class_stats(0, 1, maps, std)
    with pytest.raises(ValueError, match="class mean of level 0"):
        model.set_class_stats(0, 0, torch.zeros(3), std)
    x = torch.randn(4, 3, dtype=torch.double)
    y, pos = torch.ones(4, dtype=torch.long), torch.arange(4)
    got = model.forward_level(0, x, y, pos)
    torch.testing.assert_close(model.inverse_level(0, got.z, y, pos), x)
    channel = CCNF([3], [[2, 2]], ccnf_spec(FlowConfig(**kw), [3]), n_classes=2).double().eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("class_mean")}
    channel.load_state_dict(state, strict=False)
    for p in range(4):
        channel.set_class_stats(0, 1, maps[p], std)
        want = channel.forward_level(0, x[p : p + 1], y[:1], pos[p : p + 1]).log_prob
        torch.testing.assert_close(got.log_prob[p : p + 1], want)
    # without class_norm nothing is subtracted: the key is not read and no map is kept, so
    # switching class_norm off needs no second override
    off = FlowConfig(**{**kw, "class_norm": False}, class_norm_mean="position")
    plain = CCNF([3], [[2, 2]], ccnf_spec(off, [3]), n_classes=2)
    assert not plain.positional_mean and plain.class_mean_0.shape == (2, 3)


def test_low_rank_class_mean_is_the_channel_mean_plus_the_leading_singular_components() -> None:
    """flow.class_mean_rank r: the map subtracted is mu + the best rank-r approximation of
    M - mu (Eckart-Young: the truncated SVD), kept as float16 factors; a vector at position p
    scores as the whole-map flow would with that map; full rank gives the map back."""
    torch.manual_seed(0)
    kw = dict(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=4, warmup_steps=0,
              class_norm=True, class_norm_mean="position")
    grid, d = [[3, 4]], 5
    maps, std = torch.randn(12, d) * 3, torch.rand(d) + 0.5
    mu = maps.mean(0)
    u, s, vh = torch.linalg.svd((maps - mu).double(), full_matrices=False)
    for rank in (1, 2, 5, 7):
        net = CCNF([d], grid, ccnf_spec(FlowConfig(**kw, class_mean_rank=rank), [d]),
                   n_classes=2).eval()
        net.set_class_stats(0, 1, maps, std)
        k = min(rank, d)
        best = (mu.double() + (u[:, :k] * s[:k]) @ vh[:k]).float()
        torch.testing.assert_close(net.class_mean_map(0, 1), best, atol=3e-3, rtol=2e-3)
        assert net.class_mean_basis_0.dtype == torch.float16 and net.class_mean_0.shape == (2, d)
        assert net.class_mean_basis_0.shape == (2, 12, rank)
        assert net.class_mean_loading_0.shape == (2, rank, d)
        if rank >= d:
            torch.testing.assert_close(net.class_mean_map(0, 1), maps, atol=1e-2, rtol=1e-2)
        # the same weights with the whole map set to what the low-rank flow keeps
        whole = CCNF([d], grid, ccnf_spec(FlowConfig(**kw), [d]), n_classes=2).eval()
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("class_mean")}
        whole.load_state_dict(state, strict=False)
        whole.set_class_stats(0, 1, net.class_mean_map(0, 1), std)
        x, y, pos = torch.randn(12, d), torch.ones(12, dtype=torch.long), torch.arange(12)
        got = net.forward_level(0, x, y, pos)
        torch.testing.assert_close(got.log_prob, whole.forward_level(0, x, y, pos).log_prob)
        torch.testing.assert_close(net.inverse_level(0, got.z, y, pos), x, atol=1e-4, rtol=1e-4)
    # a later class's rows start neutral; the stored bytes are the factors' (2 per value)
    net.add_classes(1)
    assert net.class_mean_basis_0.shape == (3, 12, 7) and not net.class_mean_basis_0[2].any()
    with pytest.raises(ValueError, match=r"class mean of level 0 must be \(12, 5\)"):
        net.set_class_stats(0, 2, mu, std)
    restored = CCNF.from_checkpoint(net.checkpoint(), net.cfg)
    torch.testing.assert_close(restored.class_mean_map(0, 1), net.class_mean_map(0, 1))
    with pytest.raises(ValueError, match="greater than or equal"):
        FlowConfig(**kw, class_mean_rank=-1)


def test_class_actnorm_logdet_inverse_and_identity_start() -> None:
    """flow.class_actnorm: a per-class affine in front of every coupling; log p stays exact
    (autograd Jacobian), the flow inverts, and zero parameters are the identity."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=3, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0,
                     class_actnorm=True)
    model = CCNF([5], [[2, 2]], ccnf_spec(cfg, [5]), n_classes=2).double().eval()
    no_actnorm = cfg.model_copy(update={"class_actnorm": False})
    plain = CCNF([5], [[2, 2]], ccnf_spec(no_actnorm, [5]), n_classes=2)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("actnorm")})
    plain = plain.double().eval()
    x, y, pos = torch.randn(4, 5, dtype=torch.double), torch.tensor([0, 1, 1, 0]), \
        torch.arange(4)
    torch.testing.assert_close(model.forward_level(0, x, y, pos).log_prob,
                               plain.forward_level(0, x, y, pos).log_prob)
    with torch.no_grad():
        model.actnorm_0.normal_(0, 0.3)
    out = model.forward_level(0, x, y, pos)
    for i in range(4):
        def to_z(v, i=i):
            return model.forward_level(0, v[None], y[i : i + 1], pos[i : i + 1]).z[0]
        jac = torch.autograd.functional.jacobian(to_z, x[i])
        want = (-0.5 * out.z[i].pow(2).sum() - 2.5 * math.log(2 * math.pi)
                + torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(out.log_prob[i], want, atol=1e-9, rtol=1e-9)
    per = model.actnorm_0[y]
    cond = model.condition(0, y, pos)
    back = model.flows[0].inverse(out.z, cond, model.warm(), model.embedding[y],
                                  (per[:, :, 0], per[:, :, 1]))
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-10)
    model.add_classes(2)
    assert model.actnorm_0.shape[0] == 4 and float(model.actnorm_0[2:].detach().abs().sum()) == 0.0


def test_mean_condition_reads_the_class_mean_content_at_each_position() -> None:
    """flow.mean_condition_dim k: the condition gains A_l u_y(p), u_y(p) = (m_y(p) - mean_p
    m_y) / s_y (a direct computation); log p stays an exact change of variables (the inverse
    gives x back); the map A_l is the only new tensor and the subnets' first layers grow by
    k inputs; classes whose maps differ score the same deviation differently."""
    kw = dict(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=4, warmup_steps=0,
              class_norm=True, class_norm_mean="position")
    off = CCNF([3], [[2, 2]], ccnf_spec(FlowConfig(**kw), [3]), n_classes=2)
    on = CCNF([3], [[2, 2]], ccnf_spec(FlowConfig(**kw, mean_condition_dim=5), [3]), n_classes=2)
    new = {k: v.shape for k, v in on.state_dict().items()}
    old = {k: v.shape for k, v in off.state_dict().items()}
    assert set(new) - set(old) == {"mean_projs.0.weight", "mean_projs.0.bias"}
    assert new["mean_projs.0.weight"] == (5, 3)
    grown = {k for k in old if new[k] != old[k]}
    assert grown and all(new[k][-1] == old[k][-1] + 5 for k in grown)
    on = on.double().eval()
    maps = torch.randn(2, 4, 3, dtype=torch.double) * 3
    std = torch.rand(2, 3, dtype=torch.double) + 0.5
    for c in range(2):
        on.set_class_stats(0, c, maps[c], std[c])
    y, pos = torch.tensor([1, 1, 0, 0]), torch.tensor([0, 3, 1, 2])
    want = (maps[y, pos] - maps.mean(dim=1)[y]) / std[y]
    torch.testing.assert_close(on.mean_content(0, y, pos), want)
    cond = on.condition(0, y, pos)
    assert cond.shape == (4, 2 + 4 + 5)  # [e_y, PE, A u] (concat conditioning)
    torch.testing.assert_close(cond[:, -5:], on.mean_projs[0](want))
    x = torch.randn(4, 3, dtype=torch.double)
    got = on.forward_level(0, x, y, pos)
    torch.testing.assert_close(on.inverse_level(0, got.z, y, pos), x)
    # the same deviation from the map, another content: another density
    moved = maps.clone()
    moved[1, 0] += 2.0
    on.set_class_stats(0, 1, moved[1], std[1])
    shifted = x[:1] + (moved[1, 0] - maps[1, 0])
    again = on.forward_level(0, shifted, y[:1], pos[:1]).log_prob
    assert not torch.allclose(again, got.log_prob[:1])
    with pytest.raises(ValueError, match="class_norm_mean: position"):
        CCNF([3], [[2, 2]], ccnf_spec(FlowConfig(**{**kw, "class_norm_mean": "channel"},
                                                 mean_condition_dim=5), [3]), n_classes=2)
