"""Elementary functions and the Gaussian blur with the same bits on every CPU.

numpy picks the kernels of its transcendental ufuncs (``exp``, ``sin``, ``cos``, ``arctan2``,
``power``, ...) by the instruction set it finds: AVX-512 machines run Intel's SVML, AVX2
machines numpy's own FMA code, older ones the C library. Each is accurate to a few units in
the last place, but not the same units, and the generator turns a last-bit difference into a
different image: ``alpha >= 0.5`` and ``diff > 0.04`` decide mask pixels, a retry loop consumes
random draws until a defect is large enough, and 8-bit rounding flips. The embedded dataset
hashed differently on an AVX2 and an AVX-512 machine from the same code, so CI could not
reproduce the committed study there.

The functions here use only operations IEEE 754 rounds exactly, whatever the vector width:
``+ - * /``, ``sqrt``, ``rint``, ``frexp``, comparisons and integer bit arithmetic, in float64.
Each reduces its argument to a small interval and sums a Taylor series there to below one
float64 unit (every ``_TERMS`` below is sized for its interval). They return float32 for
float32 input (as the numpy ufuncs do) and float64 otherwise.
``tests/data/test_synthetic_portable.py`` checks them against numpy and checks that the
generator calls no dispatched ufunc, even through scipy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

F64 = NDArray[np.float64]

# Cody-Waite splits: the leading parts carry few mantissa bits, so k * part is exact for the
# k that occur below (|k| < 2**20), and the reduction loses nothing to cancellation
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_PIO2_1 = 1.57079632673412561417e00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 2 / math.pi
_SQRT_HALF = math.sqrt(0.5)
_TAN_PI_8 = math.sqrt(2) - 1
_MAX_TRIG_ARG = 2.0**19  # |k| = |x| * 2/pi stays below 2**20 (exact k * _PIO2_1)
_EXP_MIN, _EXP_MAX = -708.0, 709.0  # 2**k stays a normal float64 in between


def _out_dtype(*args: Any) -> type:
    return np.float32 if all(np.asarray(a).dtype == np.float32 for a in args) else np.float64


def _horner(z: F64, coeffs: list[float]) -> F64:
    """sum_i coeffs[i] * z**i, highest power first (Horner)."""
    acc = np.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * z + c
    return acc


# exp(r) on |r| <= ln2/2: r**14 / 14! < 4e-18
_EXP_COEFFS = [1 / math.factorial(n) for n in range(14)]
# sin(r) / r and cos(r) on |r| <= pi/4, as series in r**2: next terms below 1e-21
_SIN_COEFFS = [(1 - 2 * (n % 2)) / math.factorial(2 * n + 1) for n in range(10)]
_COS_COEFFS = [(1 - 2 * (n % 2)) / math.factorial(2 * n) for n in range(10)]
# atan(v) / v on |v| <= tan(pi/16) ~ 0.199, in v**2: v**24 / 25 < 1e-18
_ATAN_COEFFS = [(1 - 2 * (n % 2)) / (2 * n + 1) for n in range(13)]
# atanh(f) / f on |f| <= 3 - 2 sqrt(2) ~ 0.172, in f**2: f**24 / 25 < 1e-19
_ATANH_COEFFS = [1 / (2 * n + 1) for n in range(13)]


def _pow2(k: NDArray[np.int64]) -> F64:
    """2**k exactly, for integer k in [-1022, 1023], from the exponent bits."""
    return ((k + 1023) << 52).view(np.float64)


def exp(x: ArrayLike) -> NDArray[np.floating]:
    """e**x; 0 below -708 (where float32 has long underflowed anyway)."""
    x64 = np.asarray(x, dtype=np.float64)
    xc = np.clip(x64, _EXP_MIN, _EXP_MAX)
    k = np.rint(xc * (1 / math.log(2)))
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    out = _horner(r, _EXP_COEFFS) * _pow2(k.astype(np.int64))
    out = np.where(x64 < _EXP_MIN, 0.0, out)
    return out.astype(_out_dtype(x))


def _reduce_half_pi(x: ArrayLike) -> tuple[F64, NDArray[np.int64]]:
    """x = k * pi/2 + r with |r| <= pi/4 (about); returns (r, k mod 4)."""
    x64 = np.asarray(x, dtype=np.float64)
    if x64.size and float(np.max(np.abs(x64))) > _MAX_TRIG_ARG:
        raise ValueError(f"portable sin/cos take |x| <= {_MAX_TRIG_ARG:g}")
    k = np.rint(x64 * _TWO_OVER_PI)
    r = ((x64 - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    return r, k.astype(np.int64) & 3


def _sin_cos_poly(r: F64) -> tuple[F64, F64]:
    r2 = r * r
    return r * _horner(r2, _SIN_COEFFS), _horner(r2, _COS_COEFFS)


def sin(x: ArrayLike) -> NDArray[np.floating]:
    """sin(x) for |x| <= 2**19."""
    r, q = _reduce_half_pi(x)
    s, c = _sin_cos_poly(r)
    out = np.where(q == 0, s, np.where(q == 1, c, np.where(q == 2, -s, -c)))
    return out.astype(_out_dtype(x))


def cos(x: ArrayLike) -> NDArray[np.floating]:
    """cos(x) for |x| <= 2**19."""
    r, q = _reduce_half_pi(x)
    s, c = _sin_cos_poly(r)
    out = np.where(q == 0, c, np.where(q == 1, -s, np.where(q == 2, -c, s)))
    return out.astype(_out_dtype(x))


def _atan_unit(t: F64) -> F64:
    """atan(t) for t in [0, 1]: atan(t) = pi/4 + atan((t-1)/(t+1)) above tan(pi/8), then one
    half-angle step, atan(u) = 2 atan(u / (1 + sqrt(1 + u**2))), and the series."""
    high = t > _TAN_PI_8
    u = np.where(high, (t - 1) / (t + 1), t)
    v = u / (1 + np.sqrt(1 + u * u))
    return np.where(high, math.pi / 4, 0.0) + 2 * (v * _horner(v * v, _ATAN_COEFFS))


def arctan2(y: ArrayLike, x: ArrayLike) -> NDArray[np.floating]:
    """The angle of (x, y) in [-pi, pi]; 0 at the origin."""
    y64, x64 = np.broadcast_arrays(np.asarray(y, np.float64), np.asarray(x, np.float64))
    ax, ay = np.abs(x64), np.abs(y64)
    big, small = np.maximum(ax, ay), np.minimum(ax, ay)
    a = _atan_unit(np.divide(small, big, out=np.zeros_like(big), where=big > 0))
    a = np.where(ay > ax, math.pi / 2 - a, a)
    a = np.where(x64 < 0, math.pi - a, a)
    return np.where(y64 < 0, -a, a).astype(_out_dtype(y, x))


def hypot(x: ArrayLike, y: ArrayLike) -> NDArray[np.floating]:
    """sqrt(x**2 + y**2) (no overflow guard: the generator's lengths are pixels)."""
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.sqrt(x64 * x64 + y64 * y64).astype(_out_dtype(x, y))


def _log_positive(x: F64) -> F64:
    """log(x) for x > 0: x = m * 2**e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(f)."""
    m, e = np.frexp(x)
    low = m < _SQRT_HALF
    m = np.where(low, 2 * m, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    f = (m - 1) / (m + 1)
    return e * _LN2_HI + (e * _LN2_LO + 2 * (f * _horner(f * f, _ATANH_COEFFS)))


def power(x: ArrayLike, p: float) -> NDArray[np.floating]:
    """max(x, 0) ** p for p > 0 (negative x is clipped: rounding can push sin(pi) below 0)."""
    if p <= 0:
        raise ValueError("portable power takes p > 0")
    x64 = np.maximum(np.asarray(x, np.float64), 0.0)
    safe = np.where(x64 > 0, x64, 1.0)
    out = np.where(x64 > 0, exp(p * _log_positive(safe)), 0.0)
    return out.astype(_out_dtype(x))


def wrap_angle(x: ArrayLike) -> NDArray[np.floating]:
    """x - 2 pi round(x / 2 pi): the angle in [-pi, pi] (what ``angle(exp(1j x))`` gives)."""
    x64 = np.asarray(x, np.float64)
    return (x64 - (2 * math.pi) * np.rint(x64 / (2 * math.pi))).astype(_out_dtype(x))


def gaussian_filter1d(
    a: NDArray[Any], sigma: float, axis: int = -1, mode: str = "reflect", truncate: float = 4.0
) -> NDArray[Any]:
    """scipy.ndimage.gaussian_filter1d with the kernel built from :func:`exp` (scipy's own
    kernel uses ``numpy.exp``); same radius, normalisation, modes and output dtype."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.asarray(exp(-0.5 / (float(sigma) ** 2) * (x * x)), np.float64)
    weights = weights / weights.sum()
    return ndimage.correlate1d(a, weights[::-1], axis, mode=mode, cval=0.0, origin=0)


def gaussian_filter(
    a: NDArray[Any], sigma: float | tuple[float, ...], mode: str = "reflect", truncate: float = 4.0
) -> NDArray[Any]:
    """scipy.ndimage.gaussian_filter (order 0): one :func:`gaussian_filter1d` per axis whose
    sigma is above 1e-15, in axis order; a scalar sigma blurs every axis."""
    sigmas = [float(sigma)] * a.ndim if np.isscalar(sigma) else [float(s) for s in sigma]
    if len(sigmas) != a.ndim:
        raise ValueError(f"{len(sigmas)} sigmas for an array of {a.ndim} axes")
    out = np.asarray(a)
    for axis, s in enumerate(sigmas):
        if s > 1e-15:
            out = gaussian_filter1d(out, s, axis, mode=mode, truncate=truncate)
    return out
