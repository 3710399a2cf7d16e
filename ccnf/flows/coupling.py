"""Conditional affine coupling (RealNVP) with the CCNF stabilizers.

Split x = [x_a, x_b]; (s_raw, t) = subnet([x_a, c]);
  s = alpha * tanh(s_raw / alpha) * w      (soft clamp, stabilizer 2; warm-up w, stabilizer 3)
  y = [x_a, x_b * exp(s) + t],   log|det dy/dx| = sum(s).
The subnet's linear layers are :class:`SNLinear` (spectral norm, stabilizer 1).
w = min(1, step / warmup_steps) goes from 0 (additive, volume preserving) to 1 (affine).
"""

from __future__ import annotations

import torch
from torch import nn

from ccnf.flows.spectral import SNLinear


class ConditionalAffineCoupling(nn.Module):
    """One affine coupling block.

    forward(x (N, D), cond (N, K), warm in [0, 1]) -> (y (N, D), logdet (N,), s (N, D - D//2)).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        hidden_dim: int,
        *,
        clamp_alpha: float,
        spectral_norm: bool,
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"coupling needs at least 2 dimensions, got {dim}")
        self.dim_a = dim // 2
        self.dim_b = dim - self.dim_a
        self.clamp_alpha = clamp_alpha
        self.hidden = SNLinear(self.dim_a + cond_dim, hidden_dim, enabled=spectral_norm)
        self.out = SNLinear(hidden_dim, 2 * self.dim_b, enabled=spectral_norm)
        self.act = nn.ReLU()

    def _scale_shift(
        self, x_a: torch.Tensor, cond: torch.Tensor, warm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.out(self.act(self.hidden(torch.cat([x_a, cond], dim=-1))))
        s_raw, t = h.chunk(2, dim=-1)
        s = self.clamp_alpha * torch.tanh(s_raw / self.clamp_alpha) * warm
        return s, t

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, warm: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.dim_a], x[:, self.dim_a :]
        s, t = self._scale_shift(x_a, cond, warm)
        y_b = x_b * torch.exp(s) + t
        return torch.cat([x_a, y_b], dim=-1), s.sum(dim=-1), s

    def inverse(self, y: torch.Tensor, cond: torch.Tensor, warm: float = 1.0) -> torch.Tensor:
        y_a, y_b = y[:, : self.dim_a], y[:, self.dim_a :]
        s, t = self._scale_shift(y_a, cond, warm)
        return torch.cat([y_a, (y_b - t) * torch.exp(-s)], dim=-1)
