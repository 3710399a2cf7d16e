"""The log-scale of an affine coupling and its two stabilizers (soft clamp, warm-up).

    s = alpha * tanh(s_raw / alpha) * w,     w = min(1, step / warmup_steps)

The soft clamp (stabilizer 2) bounds |s| < alpha smoothly (the identity near 0, so small
log-scales pass unchanged); the warm-up factor w (stabilizer 3) goes from 0 (additive coupling,
volume preserving) to 1 (affine) over ``warmup_steps`` optimizer steps.
"""

from __future__ import annotations

import torch


def soft_clamp(s_raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * tanh(s_raw / alpha), elementwise (any shape): values in [-alpha, alpha]."""
    return alpha * torch.tanh(s_raw / alpha)


def clamped_log_scale(s_raw: torch.Tensor, alpha: float, warm: float) -> torch.Tensor:
    """s = soft_clamp(s_raw, alpha) * warm, elementwise (any shape)."""
    return soft_clamp(s_raw, alpha) * warm


def warmup_factor(step: int | torch.Tensor, warmup_steps: int) -> float:
    """w = min(1, step / warmup_steps) (1 when warmup_steps is 0); step: an int or a 0-d
    tensor (a ``global_step`` buffer)."""
    if warmup_steps == 0:
        return 1.0
    return min(1.0, float(step) / warmup_steps)
