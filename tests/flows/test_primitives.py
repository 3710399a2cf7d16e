"""The shared flow primitives: Gaussian base density, log-scale, affine transform,
permutations and patch sampling (used by CCNF and the per-class baselines alike)."""

from __future__ import annotations

import math

import pytest
import torch

from ccnf.flows.affine import coupling_forward, coupling_inverse
from ccnf.flows.gaussian import (
    LOG_2PI,
    half_sq_norm,
    log_normal,
    log_normal_from_half_sq,
    log_normalizer,
)
from ccnf.flows.log_scale import clamped_log_scale, soft_clamp, warmup_factor
from ccnf.flows.permutation import half_swap_permutations
from ccnf.patches import gather_patches, sample_positions


def test_log_normal_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.double)
    mu = torch.randn(5, 7, dtype=torch.double)
    want = torch.distributions.Normal(mu, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z, mu), want, atol=1e-12, rtol=1e-12)
    want0 = torch.distributions.Normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z), want0, atol=1e-12, rtol=1e-12)
    assert math.log(2 * math.pi) == LOG_2PI
    assert log_normalizer(7) == 0.5 * 7 * LOG_2PI


def test_half_sq_norm_over_a_channel_dim() -> None:
    z = torch.randn(2, 3, 4, 5)
    half = half_sq_norm(z, dim=1)
    assert half.shape == (2, 4, 5)
    torch.testing.assert_close(half, 0.5 * (z**2).sum(1))
    torch.testing.assert_close(
        log_normal_from_half_sq(half, 3), -half - 1.5 * math.log(2 * math.pi)
    )


def test_soft_clamp_bounds_and_warmup() -> None:
    s_raw = torch.linspace(-50, 50, 101)
    s = soft_clamp(s_raw, 1.9)
    assert s.abs().max() <= 1.9  # tanh saturates to 1 in float32
    torch.testing.assert_close(soft_clamp(torch.tensor([1e-4]), 1.9), torch.tensor([1e-4]))
    assert torch.equal(clamped_log_scale(s_raw, 1.9, 0.5), s * 0.5)
    assert torch.all(clamped_log_scale(s_raw, 1.9, 0.0) == 0)
    assert warmup_factor(10, 0) == 1.0
    assert warmup_factor(torch.tensor(5), 20) == 0.25
    assert warmup_factor(30, 20) == 1.0


@pytest.mark.parametrize("shape", [(4, 5), (2, 6, 3, 3)])
def test_affine_coupling_inverts_and_logdet(shape) -> None:
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.double)
    d_a = shape[1] // 2
    w = torch.randn(shape[1] - d_a, d_a, dtype=torch.double)

    def scale_shift(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.einsum("oi,ni...->no...", w, a)
        return soft_clamp(h, 1.5), h.tanh()

    y, s = coupling_forward(x, d_a, scale_shift)
    assert y.shape == x.shape and s.shape == (shape[0], shape[1] - d_a, *shape[2:])
    assert torch.equal(y[:, :d_a], x[:, :d_a])
    torch.testing.assert_close(coupling_inverse(y, d_a, scale_shift), x)
    if len(shape) == 2:  # log|det| of the (triangular) Jacobian is sum(s)
        for i in range(shape[0]):
            jac = torch.autograd.functional.jacobian(
                lambda v: coupling_forward(v[None], d_a, scale_shift)[0][0], x[i]
            )
            torch.testing.assert_close(torch.linalg.slogdet(jac)[1], s[i].sum())


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_half_swap_permutations(dim) -> None:
    torch.manual_seed(dim)
    perms, inv = half_swap_permutations(dim, 3)
    assert perms.shape == inv.shape == (3, dim) and perms.dtype == torch.long
    d_a = dim // 2
    for p, q in zip(perms, inv, strict=True):
        assert sorted(p.tolist()) == list(range(dim))
        assert torch.equal(p[q], torch.arange(dim))
        # the unchanged half x_a lands in the half the next coupling transforms
        assert set(p[dim - d_a :].tolist()) == set(range(d_a))
    # drawn from the global RNG, in a fixed order
    torch.manual_seed(dim)
    again, _ = half_swap_permutations(dim, 3)
    assert torch.equal(perms, again)


def test_sample_positions_draws() -> None:
    gen = torch.Generator().manual_seed(3)
    pos = sample_positions(4, 10, 3, gen)
    want = torch.rand(4, 10, generator=torch.Generator().manual_seed(3)).argsort(dim=1)[:, :3]
    assert torch.equal(pos, want)
    assert all(len(set(row.tolist())) == 3 for row in pos)
    for k in (None, 10, 12):  # all positions, in order, and no draw
        gen = torch.Generator().manual_seed(3)
        state = gen.get_state()
        assert torch.equal(sample_positions(2, 10, k, gen), torch.arange(10).expand(2, 10))
        assert torch.equal(gen.get_state(), state)


def test_gather_patches_is_image_major() -> None:
    feats = torch.randn(5, 6, 3)
    images = torch.tensor([4, 1])
    pos = torch.tensor([[0, 5], [2, 3]])
    out = gather_patches(feats, images, pos)
    want = torch.stack([feats[4, 0], feats[4, 5], feats[1, 2], feats[1, 3]])
    assert torch.equal(out, want)
