"""A class's mean feature map in b bits a value (``flow.class_mean_bits``).

A map M (P, D) is kept as its channel mean mu (D,) and the rest R = M - mu quantized per
channel: with lo_d = min_p R_pd and step_d = (max_p R_pd - lo_d) / (2^b - 1),

    code_pd = round((R_pd - lo_d) / step_d)  in {0, ..., 2^b - 1},
    M^_pd   = mu_d + lo_d + code_pd step_d,      |M^_pd - M_pd| <= step_d / 2,

and the codes of one position packed 8 / b to a byte (low bits first): P ceil(D b / 8) bytes
instead of 4 P D, so a whole map at b = 4 costs an eighth of float32 and, unlike a low-rank
form, keeps every position's own detail. A channel whose values are all equal gets step 0
and code 0 (exact).
"""

from __future__ import annotations

import torch

MEAN_BITS = (2, 4, 8)


def bytes_per_position(channels: int, bits: int) -> int:
    """Packed bytes of one position's D codes."""
    return -(-channels * bits // 8)


def quantize_map(
    residual: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (P, D) -> (lo (D,), step (D,) float32, codes (P, ceil(D b / 8)) uint8 packed)."""
    if bits not in MEAN_BITS:
        raise ValueError(f"mean-map bits must be one of {MEAN_BITS}, got {bits}")
    r = residual.double()
    lo = r.min(dim=0).values
    levels = 2 ** bits - 1
    step = (r.max(dim=0).values - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    # a constant channel has r - lo = 0 everywhere: code 0 whatever the divisor
    codes = torch.round((r - lo) / safe).clamp(0, levels).to(torch.uint8)
    return lo.float(), step.float(), _pack(codes, bits)


def dequantize_rows(
    lo: torch.Tensor, step: torch.Tensor, codes: torch.Tensor, bits: int, channels: int
) -> torch.Tensor:
    """lo, step (N, D), codes (N, ceil(D b / 8)) uint8 -> R^ (N, D) float32: the residual
    rows of N (class, position) pairs."""
    return lo + _unpack(codes, bits, channels).float() * step


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(P, D) uint8 codes < 2^b -> (P, ceil(D b / 8)) bytes, 8 / b codes a byte."""
    per_byte = 8 // bits
    p, d = codes.shape
    width = bytes_per_position(d, bits)
    padded = codes.new_zeros(p, width * per_byte)
    padded[:, :d] = codes
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
    return (padded.view(p, width, per_byte) << shifts).sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """(N, W) bytes -> (N, channels) uint8 codes; the inverse of :func:`_pack`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    mask = 2 ** bits - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(packed.shape[0], -1)[:, :channels]
