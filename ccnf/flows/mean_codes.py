"""A class's mean feature map in b bits a value (``flow.class_mean_bits``).

A map M (P, D) is kept as its channel mean mu (D,) and the rest R = M - mu quantized per
channel: with lo_d = min_p R_pd and step_d = (max_p R_pd - lo_d) / (2^b - 1),

    code_pd = round((R_pd - lo_d) / step_d)  in {0, ..., 2^b - 1},
    M^_pd   = mu_d + lo_d + code_pd step_d,      |M^_pd - M_pd| <= step_d / 2,

and the codes of one position packed 8 / b to a byte (low bits first): P ceil(D b / 8) bytes
instead of 4 P D, so a whole map at b = 4 costs an eighth of float32 and, unlike a low-rank
form, keeps every position's own detail. A channel whose values are all equal gets step 0
and code 0 (exact).

With ``flow.class_mean_quantizer: lloyd`` the 2^b levels of a channel are not evenly spaced
between its extremes but placed where its values are (Lloyd-Max: 1-D k-means, run from the
even grid and from the quantile midpoints, the better kept), levels (D, 2^b) kept in float16
and every value coded to its nearest stored level:

    code_pd = argmin_k |R_pd - c_dk|,    M^_pd = mu_d + c_d,code_pd,

a local minimum of the squared error, never above the even grid's but for float16 rounding.
An even grid spends most of its levels on the few extreme values; on industrial12's mean
maps at b = 2 the squared error falls several times (figures in REPORT.md) for D 2^b float16
values a class instead of 2 D float32.
"""

from __future__ import annotations

import torch

MEAN_BITS = (2, 4, 8)
QUANTIZERS = ("uniform", "lloyd")
LEVELS_DTYPE = torch.float16
LLOYD_MAX_ITERATIONS = 100


def bytes_per_position(channels: int, bits: int) -> int:
    """Packed bytes of one position's D codes."""
    return -(-channels * bits // 8)


def _check_bits(bits: int) -> None:
    if bits not in MEAN_BITS:
        raise ValueError(f"mean-map bits must be one of {MEAN_BITS}, got {bits}")


def quantize_map(
    residual: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (P, D) -> (lo (D,), step (D,) float32, codes (P, ceil(D b / 8)) uint8 packed)."""
    _check_bits(bits)
    r = residual.double()
    lo = r.min(dim=0).values
    levels = 2 ** bits - 1
    step = (r.max(dim=0).values - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    # a constant channel has r - lo = 0 everywhere: code 0 whatever the divisor
    codes = torch.round((r - lo) / safe).clamp(0, levels).to(torch.uint8)
    return lo.float(), step.float(), _pack(codes, bits)


def lloyd_levels(residual: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R (P, D) -> (levels (D, 2^b) float16, ascending per channel; codes (P, ceil(D b / 8))
    uint8 packed): Lloyd-Max levels of every channel and each value's nearest stored level.

    Lloyd's iteration only finds a local minimum, so it runs twice, from the even grid of
    :func:`quantize_map` (hence never worse than it) and from the quantile midpoints (better
    when a few values lie far out), and each channel keeps the run with less squared error."""
    _check_bits(bits)
    r = residual.double().t().contiguous()  # (D, P): one row per channel
    n = 2 ** bits
    low, high = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    grid = low + (high - low) * torch.arange(n, dtype=r.dtype) / (n - 1)
    quantiles = torch.quantile(r, (torch.arange(n, dtype=r.dtype) + 0.5) / n, dim=1).t()
    runs = [_lloyd(r, start.contiguous()) for start in (grid, quantiles)]
    errors = [_squared_error(r, levels) for levels in runs]
    levels = torch.where((errors[1] < errors[0]).unsqueeze(1), runs[1], runs[0])
    stored = levels.to(LEVELS_DTYPE)
    codes = _nearest(r, stored.double())  # nearest to what the checkpoint will hold
    return stored, _pack(codes.t().to(torch.uint8), bits)


def _lloyd(r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """r (D, P), start levels (D, n) ascending -> (D, n): 1-D k-means per channel."""
    codes = _nearest(r, levels)
    for _ in range(LLOYD_MAX_ITERATIONS):
        # per-level sums (D, n) without a (D, P, n) one-hot
        count = torch.zeros_like(levels).scatter_add_(1, codes, torch.ones_like(r))
        total = torch.zeros_like(levels).scatter_add_(1, codes, r)
        # a level no value is nearest to keeps its place (1-D k-means keeps the order)
        levels = torch.where(count > 0, total / count.clamp(min=1), levels)
        again = _nearest(r, levels)
        if torch.equal(again, codes):
            break
        codes = again
    return levels


def _squared_error(r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """r (D, P), levels (D, n) -> (D,): sum over P of (r - its nearest level)^2."""
    return (r - levels.gather(1, _nearest(r, levels))).pow(2).sum(dim=1)


def _nearest(r: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """r (D, P), levels (D, n) ascending -> (D, P) long: the index of each value's nearest
    level (the lower one on a tie), from the midpoints between neighbours."""
    mid = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), r.contiguous())


def decode_with_levels(
    levels: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, bits: int
) -> torch.Tensor:
    """levels (C, D, 2^b) of every class, y (N,) the class of each row, codes (N,
    ceil(D b / 8)) uint8 -> R^ (N, D) float32: c_{y, d, code} read from one flat table
    (no (N, D, 2^b) gather)."""
    c, d, n = levels.shape
    rows = (y[:, None] * d + torch.arange(d, device=y.device)) * n  # (N, D)
    flat = levels.reshape(c * d * n).float()
    return flat[rows + _unpack(codes, bits, d).long()]


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
