"""Standard-normal base density of the flows: log N(z; mu, I) over the last dimension.

For z, mu in R^D:
    log N(z; mu, I) = -0.5 ||z - mu||^2 - 0.5 D log(2 pi),
and a flow z = f(x) gives log p(x) = log N(f(x); mu, I) + log|det df/dx|. The half squared
norm 0.5 ||z - mu||^2 is also the ``latent`` anomaly score (times 1 / D), so it has its own
function; the constant 0.5 D log(2 pi) is :func:`log_normalizer`.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def log_normalizer(dim: int) -> float:
    """0.5 * D * log(2 pi): minus the log-density of N(0, I_D) at its mean."""
    return 0.5 * dim * LOG_2PI


def half_sq_norm(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """0.5 ||z||^2 over ``dim``: (..., D, ...) -> the shape without ``dim``."""
    return 0.5 * z.pow(2).sum(dim=dim)


def log_normal_from_half_sq(half_sq: torch.Tensor, dim: int) -> torch.Tensor:
    """log N(z; mu, I_D) = -half_sq - 0.5 D log(2 pi), given half_sq = 0.5 ||z - mu||^2."""
    return -half_sq - log_normalizer(dim)


def log_normal(z: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
    """log N(z; mu, I) over the last dimension: z (N, D), mu (N, D) or None (= 0) -> (N,)."""
    centred = z if mu is None else z - mu
    return log_normal_from_half_sq(half_sq_norm(centred), z.shape[-1])
