"""FastFlow-style 2-D flow: exact log-det (against autograd), invertibility, training."""

from __future__ import annotations

import math

import pytest
import torch

from ccnf.baselines import ConvAffineCoupling, FastFlow2d, FastFlowModel
from ccnf.config import TrainConfig


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (incl. actnorm), so every log-scale term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _full_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn: R^{C*H*W} -> R^{C*H*W} at x (1, C, H, W), full Jacobian by autograd."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).reshape(-1), x.reshape(-1))
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("warm", [0.3, 1.0])
def test_coupling_logdet_matches_autograd(kernel: int, warm: float) -> None:
    torch.manual_seed(kernel)
    c = ConvAffineCoupling(5, 6, kernel, clamp_alpha=1.5).double()
    _randomize(c, kernel)
    x = torch.randn(1, 5, 3, 3, dtype=torch.double) * 2
    y, logdet = c(x, warm)
    assert logdet.shape == (1, 3, 3)
    want = _full_logdet(lambda v: c(v, warm)[0], x)
    torch.testing.assert_close(logdet.sum(), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(c.inverse(y, warm), x, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kernel", [3, 5])
def test_flow_logdet_and_per_position_nll_match_autograd(kernel: int) -> None:
    torch.manual_seed(0)
    model = FastFlowModel(
        [4],
        [[3, 3]],
        n_steps=4,
        hidden_ratio=1.5,
        kernel=kernel,
        clamp_alpha=1.9,
        warmup_steps=0,
    ).double()
    _randomize(model, 1)
    flow = model.flows[0]
    x = torch.randn(1, 4, 3, 3, dtype=torch.double) * 2
    z, logdet = flow(x)
    want = _full_logdet(lambda v: flow(v)[0], x)
    torch.testing.assert_close(logdet.sum(), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-9, rtol=1e-9)
    # the per-position patch scores add up to the exact -log p of the whole map, / C
    nll_map = model.level_maps(0, x)[0]
    log_p = -0.5 * z.pow(2).sum() - 0.5 * z.numel() * math.log(2 * math.pi) + want
    torch.testing.assert_close(nll_map.sum() * 4, -log_p, atol=1e-8, rtol=1e-9)


def test_a_mis_summed_logdet_would_be_caught() -> None:
    """Guard of the guard: an autograd log-det differs from the one without the coupling term."""
    torch.manual_seed(0)
    flow = FastFlow2d(4, n_steps=2, hidden=4, kernel=3, clamp_alpha=1.9).double()
    _randomize(flow, 2)
    x = torch.randn(1, 4, 3, 3, dtype=torch.double)
    actnorm_only = -flow.log_sigma.sum() * 9
    assert abs(_full_logdet(lambda v: flow(v)[0], x) - actnorm_only) > 1e-3


def _maps(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, 6, 6, generator=g) * 3 + 1, torch.randn(n, 8, 3, 3, generator=g)]


def _model() -> FastFlowModel:
    return FastFlowModel(
        [6, 8],
        [[6, 6], [3, 3]],
        n_steps=2,
        hidden_ratio=1.0,
        kernel=3,
        clamp_alpha=1.9,
        warmup_steps=3,
    )


def test_fit_learns_is_deterministic_and_scores_shapes() -> None:
    train = TrainConfig(epochs=6, images_per_step=4, lr=5e-3, grad_clip=1.0)
    states, logs = [], []
    for _ in range(2):
        torch.manual_seed(7)
        model = _model()
        logs.append(model.fit(_maps(12, 0), train, torch.Generator().manual_seed(3)))
        states.append(model.state_dict())
    assert len(logs[0]) == 6 * 3 and logs[0] == logs[1]
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
    assert logs[0][-1]["loss"] < logs[0][0]["loss"]
    scores = model.patch_scores(_maps(2, 5))
    assert [tuple(s.shape) for s in scores["nf"]] == [(2, 1, 6, 6), (2, 1, 3, 3)]
    far = model.patch_scores([m + 20 for m in _maps(2, 5)])
    for name in ("nf", "latent"):
        assert all((f.mean() > s.mean()).item()
                   for f, s in zip(far[name], scores[name], strict=True))
