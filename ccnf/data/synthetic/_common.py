"""Small numeric helpers shared by the class renderers and the defects.

All images are float32 (S, S, 3) in [0, 1], coordinates in pixels: pixel grids and rotated
frames, anti-aliased coverage, smoothed noise, blending and colour, Voronoi mosaics and the soft
irregular blob that both a stone inlay and the painted defects are cut from.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ccnf.data.synthetic import portable as pm

F32 = NDArray[np.float32]
Params = dict[str, Any]


# --------------------------------------------------------------------------------------------
# small numeric helpers (all images are float32 (S, S, 3) in [0, 1], coordinates in pixels)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[F32, F32]:
    """Pixel-centre coordinates (yy, xx), read-only and shared between calls."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _rotated(size: int, angle: float, cx: float, cy: float) -> tuple[F32, F32]:
    """Coordinates (a, b) of every pixel in a frame rotated by ``angle`` around (cx, cy)."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    ca, sa = math.cos(angle), math.sin(angle)
    return (ca * dx + sa * dy).astype(np.float32), (-sa * dx + ca * dy).astype(np.float32)


def _rotated_point(angle: float, dx: float, dy: float) -> tuple[float, float]:
    """The frame coordinates (a, b) of one offset (dx, dy), as :func:`_rotated` computes them."""
    ca, sa = math.cos(angle), math.sin(angle)
    return ca * dx + sa * dy, -sa * dx + ca * dy


def _polar(size: int, cx: float, cy: float) -> tuple[F32, F32]:
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    return pm.hypot(dx, dy).astype(np.float32), pm.arctan2(dy, dx).astype(np.float32)


def _cover(sdf: F32) -> F32:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(sdf + 0.5, 0.0, 1.0).astype(np.float32)


def _smoothstep(lo: float, hi: float, x: F32) -> F32:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> F32:
    """Gaussian-smoothed white noise, zero mean and unit standard deviation.

    Wide kernels are slow, so a field with sigma >= 4 px is drawn on a coarser grid (about two
    samples per sigma) and upsampled bilinearly; the result is equally smooth.
    """
    sig = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    step = [max(1, int(s_ // 2)) if s_ >= 4 else 1 for s_ in sig]
    shape = (-(-size // step[0]), -(-size // step[1]))
    field = pm.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32),
        (sig[0] / step[0], sig[1] / step[1]),
        mode="wrap",
    )
    if step != [1, 1]:
        field = ndimage.zoom(
            field, (size / shape[0], size / shape[1]), order=1, mode="grid-wrap", grid_mode=True
        )[:size, :size]
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _noise1d(rng: np.random.Generator, n: int, sigma: float) -> F32:
    line = pm.gaussian_filter1d(rng.standard_normal(n).astype(np.float32), sigma)
    return ((line - line.mean()) / (line.std() + 1e-8)).astype(np.float32)


def _lerp(img: F32, target: F32 | NDArray[np.float64], alpha: F32) -> F32:
    """Blend ``img`` toward ``target`` (image or colour) with per-pixel ``alpha`` (S, S)."""
    a = alpha[..., None]
    return (img * (1.0 - a) + np.asarray(target, dtype=np.float32) * a).astype(np.float32)


def _gray(value: F32) -> F32:
    return np.repeat(value[..., None], 3, axis=-1).astype(np.float32)


def _colour(shade: F32, rgb: NDArray[np.float64] | tuple[float, ...]) -> F32:
    return (shade[..., None] * np.asarray(rgb, dtype=np.float32)).astype(np.float32)


def _jitter(
    rng: np.random.Generator, rgb: tuple[float, float, float], amount: float
) -> list[float]:
    """Colour variation of a part or material: mostly one common brightness factor (like dye
    lots), plus a slight per-channel tint. Few degrees of freedom keep "normal" learnable."""
    gain = 1 + 1.5 * amount * rng.uniform(-1, 1)
    tint = 0.3 * amount * rng.uniform(-1, 1, 3)
    return [float(np.clip(c * gain + t, 0.0, 1.0)) for c, t in zip(rgb, tint, strict=True)]


def _voronoi(
    rng: np.random.Generator, size: int, n_seeds: int
) -> tuple[NDArray[np.int64], F32, int, tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Nearest-seed cell id and distance to that seed for every pixel (a Voronoi mosaic), the
    number of cells and the seed coordinates (y, x) in cell-id order."""
    seeds = np.zeros((size, size), dtype=bool)
    ys = rng.integers(0, size, n_seeds)
    xs = rng.integers(0, size, n_seeds)
    seeds[ys, xs] = True
    ids = np.full((size, size), -1, dtype=np.int64)
    n = int(seeds.sum())
    ids[seeds] = np.arange(n)
    dist, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    return ids[iy, ix], dist.astype(np.float32), n, np.nonzero(seeds)


def _blob(
    rng: np.random.Generator, size: int, cy: float, cx: float, radius: float, rough: float
) -> F32:
    """A soft irregular blob; the value 0.5 iso-line is its outline."""
    yy, xx = _grid(size)
    aspect = rng.uniform(0.6, 1.0)
    rot = rng.uniform(0, math.pi)
    dx, dy = xx - cx, yy - cy
    u = (math.cos(rot) * dx + math.sin(rot) * dy) / radius
    v = (-math.sin(rot) * dx + math.cos(rot) * dy) / (radius * aspect)
    field = 1 - pm.hypot(u, v) + rough * _noise(rng, size, max(radius / 3, 1.0))
    return _smoothstep(-0.15, 0.15, field)
