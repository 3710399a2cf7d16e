from __future__ import annotations

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
    model = CCNF([2], [[1, 1]], cfg, n_classes=1).double().eval()
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
    model = CCNF([6, 10], [[4, 4], [2, 2]], cfg, n_classes=2)
    before = model.embedding.detach().clone()
    model.add_classes(3)
    assert model.n_classes == 5
    torch.testing.assert_close(model.embedding[:2].detach(), before)
    again = CCNF.from_checkpoint(model.checkpoint(classes=list("abcde")), cfg)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_warmup_factor_ramps_to_one() -> None:
    cfg = FlowConfig(warmup_steps=10, n_couplings=1, hidden_dim=4, embedding_dim=2, pos_dim=4)
    model = CCNF([4], [[2, 2]], cfg)
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
