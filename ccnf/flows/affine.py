"""The affine coupling transform (RealNVP), independent of the subnet that drives it.

Split x along dim 1 into x_a = x[:, :d_a] and x_b = x[:, d_a:]; (s, t) = g(x_a) with s, t
shaped like x_b; then
    forward:  y = [x_a, x_b * exp(s) + t],      log|det dy/dx| = sum of s over dim 1
    inverse:  x = [y_a, (y_b - t) * exp(-s)]
x may be (N, D) patch vectors or (B, C, H, W) maps (channels split; s is then per pixel and
the log-det sums over channels only, one value per position).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScaleShift = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def coupling_forward(
    x: torch.Tensor, d_a: int, scale_shift: ScaleShift
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D, ...) -> (y (N, D, ...), s (N, D - d_a, ...)); log|det| = s.sum(dim=1)."""
    x_a, x_b = x[:, :d_a], x[:, d_a:]
    s, t = scale_shift(x_a)
    return torch.cat([x_a, x_b * torch.exp(s) + t], dim=1), s


def coupling_inverse(y: torch.Tensor, d_a: int, scale_shift: ScaleShift) -> torch.Tensor:
    """y (N, D, ...) -> x (N, D, ...), the inverse of :func:`coupling_forward`."""
    y_a, y_b = y[:, :d_a], y[:, d_a:]
    s, t = scale_shift(y_a)
    return torch.cat([y_a, (y_b - t) * torch.exp(-s)], dim=1)
