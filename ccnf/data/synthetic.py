"""Embedded synthetic industrial dataset (DESIGN.md section 6), generated in MVTec AD layout.

Nothing can be downloaded at run time, so the default study runs on this dataset. It is built
to be a fair test bed rather than a toy:

* 15 classes, 9 textures and 6 objects, 10 RGB and 5 grayscale (stored as 1-channel PNG, like
  MVTec's grid/screw/zipper);
* every normal image is drawn from a distribution: pose (rotation, shift), illumination (gain,
  colour cast, gradient), colour, scale and texture phase vary per image, and some classes
  have rare-but-normal variation (knots in ``oak``, date codes on ``ic``, margins on
  ``perforated``, speckle density on the pills);
* near-duplicate classes that share material, so that one class's normal is anomalous for the
  other and a class-agnostic model confuses them: weave/twill (same threads, other
  interlacing), granite/terrazzo (same grains, dense vs. set in cement), brushed/perforated
  (same sheet), washer/hexnut (same turned steel, round vs. hex), caplet/tablet (same coating,
  ink and press), plus looser pairs (mesh/perforated, oak/hide, gear/washer on one conveyor);
* eight defect kinds with exact masks, many subtle (low contrast, small): scratch, hole, stain,
  missing_part, cut_paste (from elsewhere in the image or another image of the class),
  noise_patch (a foreign texture), misprint, and mix_up (the near-duplicate's part in place of
  this class's part; the mask is both parts' silhouettes). Some defects are the sibling's
  material: a misweave in weave is twill, a filler patch in granite is terrazzo.

Calibration (``ccnf data check``, :mod:`ccnf.data.calibration`): a training-free 1-NN patch
memory should find the set hard but learnable, and a memory pooled over all classes must do
worse than per-class memories. Local "sibling material" defects hide only partly from a pooled
memory (their boundary stays novel); the mix-ups are what make class conditioning matter at
the image level. Per-class ``contrast``/``scale`` factors in ``_SPECS`` set each class's
difficulty.

Determinism: every image gets its own ``numpy.random.Generator`` seeded from
``(seed, crc32(class), split, defect kind, index)``, so the output is bit-identical across runs
and independent of generation order, worker count and set size. Rendering is a pure function
of the sampled parameters: ``missing_part``, ``misprint`` (and a few class-specific kinds)
re-render the same parameters with one change and take the mask from the difference of the
two clean renders, so those masks are exact by construction. The other kinds paint onto the
clean render with an alpha map; the mask is where that alpha reaches one half.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from ccnf.atomic import atomic_path
from ccnf.config import SyntheticConfig
from ccnf.errors import CcnfError

F32 = NDArray[np.float32]
Params = dict[str, Any]

DEFECT_KINDS: tuple[str, ...] = (
    "scratch",
    "hole",
    "stain",
    "missing_part",
    "cut_paste",
    "noise_patch",
    "misprint",
    "mix_up",
)


@dataclass(frozen=True)
class ClassInfo:
    """What a synthetic class is: used by the README, the sample grid and the tests."""

    kind: Literal["texture", "object"]
    colour: Literal["rgb", "gray"]
    near_duplicates: tuple[str, ...]
    defects: tuple[str, ...]
    description: str

    @property
    def mix_up_with(self) -> str | None:
        """The class whose part turns up in a ``mix_up`` defect: the first near-duplicate."""
        return self.near_duplicates[0] if "mix_up" in self.defects else None


CLASS_INFO: dict[str, ClassInfo] = {
    "weave": ClassInfo(
        "texture",
        "rgb",
        ("twill",),
        ("hole", "stain", "misprint", "scratch"),
        "plain-woven navy fabric; misprint = a block woven as twill",
    ),
    "twill": ClassInfo(
        "texture",
        "rgb",
        ("weave",),
        ("misprint", "stain", "noise_patch", "cut_paste"),
        "2/2 twill of weave's threads (diagonal ribs); misprint = a block woven plain",
    ),
    "mesh": ClassInfo(
        "texture",
        "gray",
        ("perforated",),
        ("missing_part", "stain", "scratch", "noise_patch"),
        "woven wire grid over a dark slot",
    ),
    "perforated": ClassInfo(
        "texture",
        "gray",
        ("mesh", "brushed"),
        ("hole", "scratch", "stain", "missing_part"),
        "brushed's sheet with a hexagonal lattice of punched holes; missing_part = unpunched",
    ),
    "granite": ClassInfo(
        "texture",
        "rgb",
        ("terrazzo",),
        ("scratch", "stain", "noise_patch", "hole"),
        "dense mosaic of pink, grey, white and black grains; noise_patch = cement filler",
    ),
    "terrazzo": ClassInfo(
        "texture",
        "rgb",
        ("granite",),
        ("hole", "stain", "scratch", "noise_patch"),
        "cement matrix with sparse chips of granite's palette; noise_patch = granite grains",
    ),
    "brushed": ClassInfo(
        "texture",
        "gray",
        ("perforated", "washer"),
        ("scratch", "hole", "stain", "noise_patch"),
        "brushed metal streaks; hole = a stray punch like perforated's holes",
    ),
    "oak": ClassInfo(
        "texture",
        "rgb",
        ("hide",),
        ("scratch", "hole", "stain", "cut_paste"),
        "wood board with growth rings and grain; some boards have a knot (normal)",
    ),
    "hide": ClassInfo(
        "texture",
        "rgb",
        ("oak",),
        ("scratch", "hole", "stain", "noise_patch"),
        "pebbled brown leather with a crease network",
    ),
    "washer": ClassInfo(
        "object",
        "gray",
        ("hexnut", "gear"),
        ("scratch", "missing_part", "stain", "mix_up"),
        "turned steel washer with a key tab, any rotation; missing_part = a flat or a bite; "
        "mix_up = a hexnut",
    ),
    "hexnut": ClassInfo(
        "object",
        "gray",
        ("washer",),
        ("scratch", "missing_part", "stain", "mix_up"),
        "hex nut of the washer's steel, threaded bore; missing_part = a corner worn round or "
        "broken; mix_up = a washer",
    ),
    "caplet": ClassInfo(
        "object",
        "rgb",
        ("tablet",),
        ("misprint", "stain", "missing_part", "mix_up"),
        "cream capsule-shaped pill with red speckles and a 'CF' imprint; mix_up = a tablet",
    ),
    "tablet": ClassInfo(
        "object",
        "rgb",
        ("caplet",),
        ("misprint", "stain", "missing_part", "mix_up"),
        "round tablet of the caplet's coating with a score line and an 'NF' imprint, any "
        "rotation; mix_up = a caplet",
    ),
    "ic": ClassInfo(
        "object",
        "rgb",
        (),
        ("misprint", "missing_part", "scratch", "cut_paste"),
        "14-pin IC on a green board; the second marking line is a varying date code",
    ),
    "gear": ClassInfo(
        "object",
        "rgb",
        ("washer",),
        ("missing_part", "hole", "stain", "mix_up"),
        "ivory nylon spur gear with five lightening holes, any rotation; mix_up = a washer",
    ),
}

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(CLASS_INFO)

# 5 tasks x 3 classes. Every near-duplicate pair is split across two tasks, so a continual
# model must keep telling them apart after the second one arrives.
SYNTHETIC_SPLIT: list[list[str]] = [
    ["weave", "mesh", "washer"],
    ["granite", "caplet", "brushed"],
    ["twill", "oak", "ic"],
    ["perforated", "tablet", "hide"],
    ["terrazzo", "hexnut", "gear"],
]

_SPLIT_CODE = {"train": 0, "test_good": 1, "test_defect": 2}


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
    return np.hypot(dx, dy).astype(np.float32), np.arctan2(dy, dx).astype(np.float32)


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
    field = ndimage.gaussian_filter(
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
    line = ndimage.gaussian_filter1d(rng.standard_normal(n).astype(np.float32), sigma)
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


# 5x7 dot-matrix glyphs for imprints and laser markings (hand-drawn, rows top to bottom).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    " ": (".....",) * 7,
}
# a misprint may swap a character for a look-alike
_LOOKALIKE = {
    "C": "G",
    "F": "E",
    "N": "H",
    "0": "8",
    "1": "7",
    "2": "3",
    "3": "8",
    "4": "1",
    "5": "6",
    "6": "5",
    "7": "1",
    "8": "0",
    "9": "8",
    " ": " ",
    "E": "F",
    "G": "C",
    "H": "N",
}


def _text_bitmap(text: str) -> F32:
    cols: list[NDArray[np.float32]] = []
    for i, ch in enumerate(text):
        glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[ch]], dtype=np.float32)
        if i:
            cols.append(np.zeros((7, 1), dtype=np.float32))
        cols.append(glyph)
    # one empty cell around the text so interpolation fades to zero at the border
    return np.pad(np.concatenate(cols, axis=1), 1).astype(np.float32)


def _text(size: int, text: str, cx: float, cy: float, height: float, angle: float) -> F32:
    """Coverage (S, S) of ``text`` printed with glyph height ``height`` px, rotated."""
    bitmap = _text_bitmap(text)
    cell = height / 7.0
    a, b = _rotated(size, angle, cx, cy)
    u = a / cell + bitmap.shape[1] / 2.0 - 0.5
    v = b / cell + bitmap.shape[0] / 2.0 - 0.5
    val = ndimage.map_coordinates(bitmap, [v.ravel(), u.ravel()], order=1, mode="constant")
    return _smoothstep(0.3, 0.7, val.reshape(size, size).astype(np.float32))


# --------------------------------------------------------------------------------------------
# scenes and class renderers


@dataclass
class Scene:
    """A clean render: ``img`` (S, S, 3); ``fg`` (S, S) in [0, 1], the surface on which defects
    may lie (all ones for textures); ``bg`` what a hole through the part shows (None: a dark
    cavity)."""

    img: F32
    fg: F32
    bg: F32 | None = None


Sampler = Callable[[np.random.Generator, int], Params]
Renderer = Callable[[Params, int], Scene]
Alterer = Callable[[str, Params, np.random.Generator, int], Params]


@dataclass(frozen=True)
class _Spec:
    sample: Sampler
    render: Renderer
    alter: Alterer | None = None
    # defect kinds made by re-rendering altered parameters (mask = difference of renders)
    altered: tuple[str, ...] = ("missing_part", "misprint")
    # multiplies the contrast of painted defects: < 1 makes a class harder
    contrast: float = 1.0
    # multiplies the size of painted defects
    scale: float = 1.0


def _pose(rng: np.random.Generator, size: int, shift: float, rot: float) -> Params:
    return {
        "cx": size / 2 + rng.uniform(-shift, shift) * size,
        "cy": size / 2 + rng.uniform(-shift, shift) * size,
        "angle": rng.uniform(-rot, rot),
    }


# ---- textures ------------------------------------------------------------------------------


def _sample_weave(rng: np.random.Generator, size: int, twill: bool = False) -> Params:
    # weave and twill share threads, colours and scale: only the interlacing differs, so a
    # misweave in one (a patch woven the other way) is the other's normal
    return {
        "angle": math.radians(rng.uniform(-3, 3)),
        "period": (13.0 if twill else 14.0) * rng.uniform(0.97, 1.03),
        "phase": rng.uniform(0, 1, 2).tolist(),
        "warp": _jitter(rng, (0.20, 0.27, 0.50), 0.05),
        "weft": _jitter(rng, (0.36, 0.42, 0.62), 0.05),
        "twill": twill,
        "misweave": None,
        "seed": int(rng.integers(2**31)),
    }


def _render_weave(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    a, b = _rotated(size, p["angle"], size / 2, size / 2)
    period = p["period"] * k
    ta = a / period + p["phase"][0]
    tb = b / period + p["phase"][1]
    i, j = np.floor(ta), np.floor(tb)
    fa, fb = ta - i, tb - j
    twill_top = (i - j) % 4 < 2
    plain_top = (i + j) % 2 == 0
    twill = np.full(i.shape, p["twill"])
    if p["misweave"] is not None:
        # a block of cells interlaced the other way
        i0, j0, ni, nj = p["misweave"]
        block = (i >= i0) & (i < i0 + ni) & (j >= j0) & (j < j0 + nj)
        twill = np.where(block, ~twill, twill)
    warp_top = np.where(twill, twill_top, plain_top)
    # thread profile across a thread (dark gaps between threads), bulge along the float
    prof_warp = np.sin(np.pi * fa) ** 0.6 * (0.78 + 0.22 * np.sin(np.pi * fb))
    prof_weft = np.sin(np.pi * fb) ** 0.6 * (0.78 + 0.22 * np.sin(np.pi * fa))
    fibre_warp = _noise(rng, size, (3.0 * k, 0.6 * k))
    fibre_weft = _noise(rng, size, (0.6 * k, 3.0 * k))
    warp = _colour(prof_warp * (1 + 0.10 * fibre_warp), p["warp"])
    weft = _colour(prof_weft * (1 + 0.10 * fibre_weft), p["weft"])
    img = np.where(warp_top[..., None], warp, weft) * 1.25
    return Scene(img.astype(np.float32), np.ones((size, size), np.float32))


def _alter_weave(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    q = dict(p)
    cells = size / (p["period"] * size / 256)
    ni, nj = (int(v) for v in rng.integers(3, 8, 2))
    # a block around a random point well inside the image (in thread-cell coordinates)
    centre = rng.uniform(-0.3, 0.3, 2) * cells
    q["misweave"] = (
        float(np.floor(centre[0] + p["phase"][0])) - ni // 2,
        float(np.floor(centre[1] + p["phase"][1])) - nj // 2,
        ni,
        nj,
    )
    return q


def _sample_mesh(rng: np.random.Generator, size: int) -> Params:
    return {
        "angle": math.radians(rng.uniform(-4, 4)),
        "period": 20.0 * rng.uniform(0.97, 1.03),
        "width": 4.6 * rng.uniform(0.95, 1.05),
        "phase": rng.uniform(0, 1, 2).tolist(),
        "albedo": rng.uniform(0.62, 0.74),
        "cuts": [],
        "seed": int(rng.integers(2**31)),
    }


def _render_mesh(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    a, b = _rotated(size, p["angle"], size / 2, size / 2)
    period, half = p["period"] * k, p["width"] * k / 2
    ta = a / period + p["phase"][0]
    tb = b / period + p["phase"][1]
    ia, ib = np.round(ta), np.round(tb)
    da, db = (ta - ia) * period, (tb - ib) * period  # signed px distance to nearest wire
    cov_v = _cover(half - np.abs(da))  # wires running along b
    cov_h = _cover(half - np.abs(db))
    for direction, line, start, length in p["cuts"]:
        # a broken wire: no coverage over a stretch of one wire
        if direction == 0:
            cut = (ia == line) & (tb >= start) & (tb <= start + length)
            cov_v = np.where(cut, 0.0, cov_v)
        else:
            cut = (ib == line) & (ta >= start) & (ta <= start + length)
            cov_h = np.where(cut, 0.0, cov_h)
    shade_v = np.sqrt(np.clip(1 - (da / half) ** 2, 0, 1)) * p["albedo"] + 0.12
    shade_h = np.sqrt(np.clip(1 - (db / half) ** 2, 0, 1)) * p["albedo"] + 0.12
    # the wire passing under a crossing is shaded darker near it (it dips)
    v_top = (ia + ib) % 2 == 0
    bg = 0.11 + 0.025 * _noise(rng, size, 6 * k)
    grain = 1 + 0.05 * _noise(rng, size, 0.8 * k)
    under_v = np.where(v_top, cov_h * shade_h, cov_v * shade_v)
    under_c = np.where(v_top, cov_h, cov_v)
    top_v = np.where(v_top, cov_v * shade_v, cov_h * shade_h)
    top_c = np.where(v_top, cov_v, cov_h)
    img = bg * (1 - under_c) + under_v * 0.85
    img = img * (1 - top_c) + top_v
    return Scene(_gray(img * grain), np.ones((size, size), np.float32))


def _alter_mesh(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    q = dict(p)
    k = size / 256
    period = p["period"] * k
    # cut near the image centre so that the gap is inside the picture
    n_lines = int(rng.integers(1, 3))
    cuts = []
    for _ in range(n_lines):
        a, b = rng.uniform(-0.3, 0.3, 2) * size
        direction = int(rng.integers(2))
        ta = a / period + p["phase"][0]
        tb = b / period + p["phase"][1]
        line = float(np.round(ta if direction == 0 else tb))
        start = float(np.floor(tb if direction == 0 else ta)) + rng.uniform(0.15, 0.4)
        cuts.append((direction, line, start, rng.uniform(0.5, 2.0)))
    q["cuts"] = cuts
    return q


def _sample_perforated(rng: np.random.Generator, size: int) -> Params:
    return {
        "angle": math.radians(rng.uniform(-4, 4)),
        "period": 19.0 * rng.uniform(0.97, 1.03),
        "radius": 0.30 * rng.uniform(0.95, 1.05),
        "phase": rng.uniform(0, 1, 2).tolist(),
        "sheet": rng.uniform(0.5, 0.62),
        "streak": rng.uniform(0.04, 0.06),
        # half of the sheets show an unperforated margin along one side
        "margin": (int(rng.integers(4)), rng.uniform(0.06, 0.3)) if rng.uniform() < 0.5 else None,
        "plug": None,
        "seed": int(rng.integers(2**31)),
    }


def _hex_lattice(
    a: F32, b: F32, period: float, phase: list[float]
) -> tuple[F32, NDArray[np.int64], NDArray[np.int64], F32, F32]:
    """Distance to the nearest node of a hexagonal lattice, its integer index, and offsets."""
    h = period * math.sqrt(3) / 2
    # lattice coordinates: node (i, j) at (i*period + j*period/2, j*h) + phase
    v = b / h + phase[1]
    u = a / period + phase[0] - v / 2
    best = np.full(a.shape, np.inf, np.float32)
    bi = np.zeros(a.shape, np.int64)
    bj = np.zeros(a.shape, np.int64)
    bda = np.zeros(a.shape, np.float32)
    bdb = np.zeros(a.shape, np.float32)
    fu, fv = np.floor(u), np.floor(v)
    for di in (0, 1):
        for dj in (0, 1):
            i, j = fu + di, fv + dj
            da = (u - i + (v - j) / 2) * period
            db = (v - j) * h
            d = np.hypot(da, db)
            closer = d < best
            best = np.where(closer, d, best)
            bi = np.where(closer, i, bi).astype(np.int64)
            bj = np.where(closer, j, bj).astype(np.int64)
            bda = np.where(closer, da, bda)
            bdb = np.where(closer, db, bdb)
    return best.astype(np.float32), bi, bj, bda, bdb


def _sheet(rng: np.random.Generator, size: int, b: F32, level: float, streak: float) -> F32:
    """Brushed sheet metal: fine streaks along ``a`` (constant across ``b``), patchy in length.

    Shared by ``brushed`` and ``perforated``, so a plugged hole of one is the other's normal.
    """
    k = size / 256
    n = 4 * size
    idx = np.clip(b * 2 + 2 * size, 0, n - 1)
    fine = np.interp(idx, np.arange(n), _noise1d(rng, n, 0.8 * k))
    coarse = np.interp(idx, np.arange(n), _noise1d(rng, n, 6 * k))
    # streaks fade in and out along their length: unrotated anisotropic noise is close enough
    # for the few degrees of rotation
    patchy = 1 + 0.5 * _noise(rng, size, (1.0 * k, 18 * k))
    sheen = 0.04 * _noise(rng, size, 40 * k)
    return (level + (streak * fine + 0.02 * coarse) * patchy + sheen).astype(np.float32)


def _punch(sheet: F32, dist: F32, dx: F32, dy: F32, r: float, k: float) -> F32:
    """A punched hole of radius ``r`` px (``dist``/``dx``/``dy``: offsets from its centre):
    dark inside, bevel lit on the upper left and shadowed on the lower right."""
    hole = _cover(r - dist)
    rim = np.exp(-(((dist - r) / (1.4 * k)) ** 2))
    rim_light = rim * (-(dx + dy) / (np.hypot(dx, dy) + 1e-3)) * 0.14
    inside = 0.07 + 0.05 * np.clip(dy / (r + 1e-3), -1, 1)
    return (sheet * (1 - hole) + inside * hole + rim_light * (1 - hole)).astype(np.float32)


def _render_perforated(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    a, b = _rotated(size, p["angle"], size / 2, size / 2)
    period = p["period"] * k
    dist, _, _, da, db = _hex_lattice(a, b, period, p["phase"])
    if p["margin"] is not None:
        side, width = p["margin"]
        # distance of each hole's centre from the chosen image side
        na, nb = a - da, b - db
        ca, sa = math.cos(p["angle"]), math.sin(p["angle"])
        hx, hy = ca * na - sa * nb + size / 2, sa * na + ca * nb + size / 2
        reach = (hy, size - hy, hx, size - hx)[side]
        dist = np.where(reach < width * size, np.float32(1e3), dist)
    if p["plug"] is not None:
        # holes whose centre lies in the disc are not punched
        px, py, pr = p["plug"]
        ca, cb = _rotated_point(p["angle"], px * size - size / 2, py * size - size / 2)
        plugged = np.hypot(a - da - ca, b - db - cb) < pr * size
        dist = np.where(plugged, np.float32(1e3), dist)
    sheet = _sheet(rng, size, b, p["sheet"], p["streak"])
    img = _punch(sheet, dist, da, db, p["radius"] * period, k)
    return Scene(_gray(img), np.ones((size, size), np.float32))


def _alter_perforated(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """missing_part: the holes in a disc were never punched; inside it the sheet is plain
    ``brushed`` metal."""
    q = dict(p)
    q["plug"] = (*rng.uniform(0.25, 0.75, 2).tolist(), rng.uniform(0.05, 0.14))
    return q


_GRANITE = ((0.78, 0.56, 0.50), (0.62, 0.62, 0.64), (0.13, 0.12, 0.13), (0.88, 0.86, 0.82))


def _sample_stone(rng: np.random.Generator, size: int, terrazzo: bool = False) -> Params:
    # granite and terrazzo are the same grains (size, palette, mix); terrazzo sets only a
    # fraction of them in a cement matrix. A filler patch in granite is terrazzo, a cluster of
    # grains in terrazzo is granite.
    return {
        "grain": 3.6 * rng.uniform(0.95, 1.05),
        "mix": rng.dirichlet((72, 48, 24, 16)).tolist(),
        "tone": _jitter(rng, (1.0, 1.0, 1.0), 0.025),
        "density": rng.uniform(0.25, 0.35) if terrazzo else 1.0,
        "matrix": _jitter(rng, (0.52, 0.54, 0.50), 0.03),
        "inlay": None,
        "seed": int(rng.integers(2**31)),
    }


def _render_stone(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    n_seeds = int((size / (p["grain"] * k)) ** 2)
    cell, _, n, (sy, sx) = _voronoi(rng, size, n_seeds)
    mineral = rng.choice(4, size=n, p=p["mix"])
    cell_gain = rng.uniform(0.85, 1.12, n).astype(np.float32)
    lottery = rng.uniform(size=n)  # a grain is set where lottery < density
    density = np.full(n, p["density"], np.float32)
    if p["inlay"] is not None:
        cy, cx, radius, inlay_density, inlay_seed = p["inlay"]
        blob = _blob(
            np.random.default_rng(inlay_seed), size, cy * size, cx * size, radius * size, 0.2
        )
        density = np.where(blob[sy, sx] > 0.5, inlay_density, density)
    palette = np.asarray(_GRANITE, np.float32) * np.asarray(p["tone"], np.float32)
    grains = palette[mineral][cell] * cell_gain[cell][..., None]
    matrix = (
        np.asarray(p["matrix"], np.float32)
        * (1 + 0.05 * _noise(rng, size, 0.7 * k) + 0.03 * _noise(rng, size, 8 * k))[..., None]
    )
    img = np.where((lottery < density)[cell][..., None], grains, matrix)
    img = img * (1 + 0.06 * _noise(rng, size, 0.7 * k))[..., None]
    img = ndimage.gaussian_filter(img, (0.6 * k, 0.6 * k, 0)).astype(np.float32)
    return Scene(img, np.ones((size, size), np.float32))


def _alter_inlay(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """noise_patch for granite/terrazzo: a blob of the sibling material (filler in granite,
    dense grains in terrazzo)."""
    q = dict(p)
    inlay_density = rng.uniform(0.1, 0.25) if p["density"] >= 1.0 else 1.0
    q["inlay"] = (
        *rng.uniform(0.2, 0.8, 2).tolist(),
        rng.uniform(0.07, 0.13),
        inlay_density,
        int(rng.integers(2**31)),
    )
    return q


def _sample_brushed(rng: np.random.Generator, size: int) -> Params:
    return {
        "angle": math.radians(rng.uniform(-4, 4)),
        "level": rng.uniform(0.5, 0.62),
        "streak": rng.uniform(0.04, 0.06),
        "holes": [],
        "seed": int(rng.integers(2**31)),
    }


def _render_brushed(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    _, b = _rotated(size, p["angle"], size / 2, size / 2)
    img = _sheet(rng, size, b, p["level"], p["streak"])
    yy, xx = _grid(size)
    for hx, hy, r in p["holes"]:
        # a stray punch: the same hole as ``perforated`` has, in the wrong place
        img = _punch(img, np.hypot(xx - hx, yy - hy), xx - hx, yy - hy, r * k, k)
    return Scene(_gray(img), np.ones((size, size), np.float32))


def _alter_brushed(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """hole for brushed: a stray hit of the perforating tool, the holes of ``perforated``'s
    lattice (spacing 19 px, radius 5.7 px) inside a disc, so a pooled memory finds it normal."""
    q = dict(p)
    k = size / 256
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    reach = rng.uniform(0.03, 0.12) * size
    spacing, radius = 19.0 * k, 0.3 * 19.0
    ang = p["angle"]
    holes = []
    for i in range(-4, 5):
        for j in range(-4, 5):
            u, v = (i + j / 2) * spacing, j * spacing * math.sqrt(3) / 2
            hx = cx + u * math.cos(ang) - v * math.sin(ang)
            hy = cy + u * math.sin(ang) + v * math.cos(ang)
            if math.hypot(hx - cx, hy - cy) <= reach:
                holes.append((hx, hy, radius))
    q["holes"] = holes
    return q


def _sample_oak(rng: np.random.Generator, size: int) -> Params:
    knot = rng.uniform() < 0.18
    return {
        "angle": math.radians(rng.uniform(-6, 6)),
        "ring": 13.0 * rng.uniform(0.9, 1.1),
        "phase": rng.uniform(0, 1),
        "light": _jitter(rng, (0.80, 0.62, 0.42), 0.04),
        "dark": _jitter(rng, (0.52, 0.34, 0.19), 0.04),
        "knot": (rng.uniform(0.2, 0.8, 2) * size).tolist() if knot else None,
        "knot_r": rng.uniform(6, 11),
        "seed": int(rng.integers(2**31)),
    }


def _render_oak(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    a, _ = _rotated(size, p["angle"], size / 2, size / 2)
    warp = 0.9 * _noise(rng, size, (48 * k, 20 * k)) + 0.06 * _noise(rng, size, 3 * k)
    r = a / (p["ring"] * k) + warp + p["phase"]
    darken = np.zeros((size, size), np.float32)
    if p["knot"] is not None:
        yy, xx = _grid(size)
        d = np.hypot(xx - p["knot"][0], (yy - p["knot"][1]) * 1.6)
        kr = p["knot_r"] * k
        # rings wrap around the knot; its core is dark
        r = r + 2.5 * np.exp(-((d / (3 * kr)) ** 2)) + d / kr * np.exp(-((d / (1.8 * kr)) ** 2))
        darken = 0.55 * _cover(kr - d)
    t = r - np.floor(r)
    late = np.exp(-(((t - 0.8) / 0.1) ** 2))  # dark latewood band of every ring
    grain = _noise1d(rng, 4 * size, 0.7 * k)
    gidx = np.clip(a * 2 + 2 * size, 0, 4 * size - 1)
    fibre = np.interp(gidx, np.arange(4 * size), grain) * _noise(rng, size, (1.2 * k, 14 * k))
    amount = np.clip(0.75 * late + 0.12 * fibre + darken, 0, 1)
    img = _lerp(
        np.broadcast_to(np.asarray(p["light"], np.float32), (size, size, 3)),
        p["dark"],
        amount.astype(np.float32),
    )
    return Scene(img, np.ones((size, size), np.float32))


def _sample_hide(rng: np.random.Generator, size: int) -> Params:
    return {
        "base": _jitter(rng, (0.47, 0.31, 0.19), 0.04),
        "crease": rng.uniform(0.18, 0.26),
        "pebble": 2.4 * rng.uniform(0.95, 1.05),
        "seed": int(rng.integers(2**31)),
    }


def _render_hide(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    n1 = _noise(rng, size, p["pebble"] * k)
    n2 = _noise(rng, size, 2.3 * p["pebble"] * k)
    creases = np.exp(-((n1 / p["crease"]) ** 2)) * 0.6 + np.exp(-((n2 / 0.12) ** 2)) * 0.5
    # pebbles lit from the upper left: the derivative of the smooth field acts as shading
    gy, gx = np.gradient(ndimage.gaussian_filter(np.abs(n1), k))
    shade = 1 + 0.6 * (-gx - gy) / (k + 1e-3)
    mottle = 1 + 0.08 * _noise(rng, size, 24 * k)
    pores = 1 - 0.12 * (_noise(rng, size, 0.5 * k) > 2.2)
    value = np.clip(shade * mottle * pores * (1 - 0.45 * creases), 0.2, 1.6)
    return Scene(_colour(value.astype(np.float32), p["base"]), np.ones((size, size), np.float32))


# ---- objects -------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int, rgb: tuple[float, float, float]) -> F32:
    k = size / 256
    value = 1 + 0.08 * _noise(rng, size, 1.0 * k) + 0.05 * _noise(rng, size, 20 * k)
    return _colour(value, rgb)


def _sample_washer(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.pi)
    p.update(
        outer=0.36 * rng.uniform(0.97, 1.03),
        inner=0.15 * rng.uniform(0.97, 1.03),
        metal=rng.uniform(0.5, 0.6),
        bite=None,
        flat=None,
        seed=int(rng.integers(2**31)),
    )
    return p


def _turned_face(
    rng: np.random.Generator, size: int, rho: F32, phi: F32, metal: float, edge: F32
) -> F32:
    """Turned steel shared by washer and hexnut: a fixed light's anisotropic highlight, fine
    lathe rings, and a lit chamfer along the outline (``edge``: signed px distance to it)."""
    k = size / 256
    lathe = 0.03 * np.sin(2 * np.pi * rho / (2.3 * k)) + 0.02 * _noise(rng, size, 0.7 * k)
    value = metal + 0.13 * np.cos(2 * (phi - 0.7)) + lathe
    return (value + 0.22 * np.exp(-((edge / (1.6 * k)) ** 2))).astype(np.float32)


def _render_washer(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    rho, phi = _polar(size, p["cx"], p["cy"])
    yy, xx = _grid(size)
    outer, inner = p["outer"] * size, p["inner"] * size
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    edge = outer - rho  # signed distance to the outline, positive inside
    if p["bite"] is not None:
        ang, rad = p["bite"]
        bx, by = p["cx"] + outer * math.cos(ang), p["cy"] + outer * math.sin(ang)
        edge = np.minimum(edge, np.hypot(xx - bx, yy - by) - rad * size)
    if p["flat"] is not None:
        # a flat ground onto the rim: locally the straight side of a hex nut
        ang, depth = p["flat"]
        proj = (xx - p["cx"]) * math.cos(ang) + (yy - p["cy"]) * math.sin(ang)
        edge = np.minimum(edge, outer - depth * size - proj)
    # key tab: a small tongue pointing into the bore at the washer's rotation angle
    tab = _cover(np.minimum(3.2 * k - np.abs(b), a - (inner - 0.045 * size))) * (a > 0)
    cov = _cover(edge) * np.maximum(_cover(rho - inner), tab)
    value = _turned_face(rng, size, rho, phi, p["metal"], edge)
    value = value + 0.16 * np.exp(-(((rho - inner) / (1.4 * k)) ** 2))
    bg = _background(rng, size, (0.16, 0.16, 0.16))
    img = _lerp(bg, _gray(value), cov)
    return Scene(img, cov, bg)


def _alter_bite(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """missing_part for round parts: a bite out of the rim at a random angle."""
    q = dict(p)
    q["bite"] = (rng.uniform(-math.pi, math.pi), rng.uniform(0.025, 0.07))
    return q


def _alter_washer(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """missing_part for the washer: a flat ground onto the rim, or a bite out of it."""
    if rng.uniform() < 0.4:
        return _alter_bite(kind, p, rng, size)
    q = dict(p)
    q["flat"] = (rng.uniform(-math.pi, math.pi), rng.uniform(0.015, 0.05))
    return q


def _sample_hexnut(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.pi / 6)
    p.update(
        radius=0.39 * rng.uniform(0.97, 1.03),
        bore=0.15 * rng.uniform(0.97, 1.03),
        metal=rng.uniform(0.5, 0.6),
        broken=None,
        seed=int(rng.integers(2**31)),
    )
    return p


def _render_hexnut(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    rho, phi = _polar(size, p["cx"], p["cy"])
    yy, xx = _grid(size)
    dx, dy = xx - p["cx"], yy - p["cy"]
    rc = p["radius"] * size
    apothem = rc * math.cos(math.pi / 6)
    proj = np.max(
        [
            dx * math.cos(p["angle"] + i * math.pi / 3)
            + dy * math.sin(p["angle"] + i * math.pi / 3)
            for i in range(6)
        ],
        axis=0,
    )
    edge = apothem - proj
    if p["broken"] is not None:
        corner, depth, rounded = p["broken"]
        ang = p["angle"] + math.pi / 6 + corner * math.pi / 3
        if rounded:
            # the corner worn round: locally the circular rim of a washer
            off = np.abs(np.angle(np.exp(1j * (phi - ang))))
            edge = np.where(off < math.pi / 6, np.minimum(edge, rc - depth * size - rho), edge)
        else:  # broken off along a straight line
            edge = np.minimum(edge, rc - depth * size - (dx * math.cos(ang) + dy * math.sin(ang)))
    bore = p["bore"] * size
    cov = _cover(edge) * _cover(rho - bore)
    value = _turned_face(rng, size, rho, phi, p["metal"], edge)
    # the thread shows as fine dark rings just inside the bore's rim
    value = value + (rho < bore + 4 * k) * (0.12 * np.sin(2 * np.pi * rho / (1.8 * k)) - 0.1)
    bg = _background(rng, size, (0.16, 0.16, 0.16))
    img = _lerp(bg, _gray(value.astype(np.float32)), cov)
    return Scene(img, cov, bg)


def _alter_hexnut(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    q = dict(p)
    if rng.uniform() < 0.8:
        q["broken"] = (int(rng.integers(6)), rng.uniform(0.02, 0.045), True)
    else:
        q["broken"] = (int(rng.integers(6)), rng.uniform(0.03, 0.08), False)
    return q


# caplet and tablet come off the same line: same coating, speckles, ink and press; they differ
# in shape and imprint, so printing one's imprint on the other is a misprint that a pooled
# memory accepts
_PILL_BODY = (0.93, 0.91, 0.85)
_PILL_INK = (0.55, 0.18, 0.16)
_PILL_PRINT = 0.12  # glyph height / image side


def _speckles(
    rng: np.random.Generator,
    size: int,
    n: int,
    cx: float,
    cy: float,
    angle: float,
    half_a: float,
    half_b: float,
) -> F32:
    """Alpha of ``n`` small red speckles scattered over a box around (cx, cy)."""
    k = size / 256
    speck = np.zeros((size, size), np.float32)
    sx = rng.uniform(-half_a, half_a, n)
    sy = rng.uniform(-half_b, half_b, n)
    sr = rng.uniform(0.7, 1.4, n) * k
    ca, sa = math.cos(angle), math.sin(angle)
    px = np.clip(np.round(cx + ca * sx - sa * sy).astype(int), 0, size - 1)
    py = np.clip(np.round(cy + sa * sx + ca * sy).astype(int), 0, size - 1)
    speck[py, px] = sr
    return np.clip(ndimage.gaussian_filter(speck, 0.8 * k) * 4, 0, 0.8).astype(np.float32)


def _sample_caplet(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.radians(8))
    p.update(
        length=0.64 * rng.uniform(0.98, 1.02),
        width=0.30 * rng.uniform(0.98, 1.02),
        body=_jitter(rng, _PILL_BODY, 0.025),
        n_speckles=int(rng.integers(25, 90)),
        print={"text": "CF", "dx": 0.0, "dy": 0.0, "contrast": 1.0, "ghost": None},
        sibling_text="NF",
        bite=None,
        seed=int(rng.integers(2**31)),
    )
    return p


def _print_cov(p: Params, size: int, height: float, ox: float, oy: float) -> F32:
    """Coverage of the imprint described by ``p['print']`` at offset (ox, oy) from the centre."""
    pr = p["print"]
    ca, sa = math.cos(p["angle"]), math.sin(p["angle"])
    cx = p["cx"] + ca * ox - sa * oy + pr["dx"] * size
    cy = p["cy"] + sa * ox + ca * oy + pr["dy"] * size
    cov = _text(size, pr["text"], cx, cy, height * size, p["angle"])
    if pr["ghost"] is not None:  # a double strike, offset by a few pixels
        gx, gy = pr["ghost"]
        ghost = _text(size, pr["text"], cx + gx * size, cy + gy * size, height * size, p["angle"])
        cov = np.maximum(cov, 0.7 * ghost)
    return (cov * pr["contrast"]).astype(np.float32)


def _render_caplet(p: Params, size: int) -> Scene:
    rng = np.random.default_rng(p["seed"])
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    half_w = p["width"] * size / 2
    seg = p["length"] * size / 2 - half_w
    d_axis = np.hypot(np.clip(np.abs(a) - seg, 0, None), b)
    cov = _cover(half_w - d_axis)
    if p["bite"] is not None:
        ang, rad = p["bite"]
        # a chip out of the rim: the bite sits on the outline in direction ``ang``
        ex, ey = math.cos(ang), math.sin(ang)
        t = np.clip(ex * seg, -seg, seg)
        bx, by = t + ex * half_w, ey * half_w
        cov = cov * _cover(np.hypot(a - bx, b - by) - rad * size)
    height = np.sqrt(np.clip(1 - (d_axis / half_w) ** 2, 0, 1))
    shade = 0.62 + 0.38 * height - 0.06 * (b / half_w)
    body = _colour(shade.astype(np.float32), p["body"])
    # red speckles in the coating, their number varies from pill to pill
    speck = _speckles(
        rng, size, p["n_speckles"], p["cx"], p["cy"], p["angle"], seg + half_w, half_w
    )
    body = _lerp(body, (0.62, 0.26, 0.2), speck)
    body = _lerp(body, _PILL_INK, _print_cov(p, size, _PILL_PRINT, 0, 0))
    bg = _background(rng, size, (0.07, 0.07, 0.08))
    return Scene(_lerp(bg, body, cov), cov, bg)


def _alter_print(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    """misprint: one of missing/wrong character, shifted, faded or double-struck print."""
    if kind == "missing_part":
        return _alter_bite(kind, p, rng, size)
    q = dict(p)
    pr = dict(p["print"])
    mode = int(rng.integers(7 if "sibling_text" in p else 5))
    text = pr["text"]
    if mode == 0:  # a character missing
        i = int(rng.integers(len(text)))
        pr["text"] = text[:i] + " " + text[i + 1 :]
    elif mode == 1:  # a character swapped for a look-alike
        i = int(rng.integers(len(text)))
        pr["text"] = text[:i] + _LOOKALIKE[text[i]] + text[i + 1 :]
    elif mode == 2:  # print shifted off its place
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.015, 0.04)
        pr["dx"], pr["dy"] = dist * math.cos(ang), dist * math.sin(ang)
    elif mode == 3:  # faded print
        pr["contrast"] = rng.uniform(0.2, 0.55)
    elif mode >= 5:  # the sibling product's imprint
        pr["text"] = p["sibling_text"]
    else:  # double strike
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.006, 0.015)
        pr["ghost"] = (dist * math.cos(ang), dist * math.sin(ang))
    q["print"] = pr
    return q


def _sample_tablet(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.pi)
    p.update(
        radius=0.29 * rng.uniform(0.98, 1.02),
        body=_jitter(rng, _PILL_BODY, 0.025),
        n_speckles=int(rng.integers(25, 90)),
        print={"text": "NF", "dx": 0.0, "dy": 0.0, "contrast": 1.0, "ghost": None},
        sibling_text="CF",
        bite=None,
        seed=int(rng.integers(2**31)),
    )
    return p


def _render_tablet(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    rho, _ = _polar(size, p["cx"], p["cy"])
    radius = p["radius"] * size
    cov = _cover(radius - rho)
    if p["bite"] is not None:
        ang, rad = p["bite"]
        yy, xx = _grid(size)
        bx, by = p["cx"] + radius * math.cos(ang), p["cy"] + radius * math.sin(ang)
        cov = cov * _cover(np.hypot(xx - bx, yy - by) - rad * size)
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    dome = np.sqrt(np.clip(1 - (rho / radius) ** 2, 0, 1))
    bevel = np.exp(-(((radius - rho) / (3 * k)) ** 2))
    shade = 0.7 + 0.3 * dome - 0.12 * bevel + 0.015 * _noise(rng, size, 0.8 * k)
    # score line across the tablet: dark groove with a lit upper edge
    groove = np.exp(-((b / (1.3 * k)) ** 2)) * 0.3 - np.exp(-(((b + 2 * k) / (1.0 * k)) ** 2)) * 0.1
    shade = shade - groove * (np.abs(a) < radius)
    body = _colour(shade.astype(np.float32), p["body"])
    speck = _speckles(rng, size, p["n_speckles"], p["cx"], p["cy"], p["angle"], radius, radius)
    body = _lerp(body, (0.62, 0.26, 0.2), speck)
    body = _lerp(body, _PILL_INK, _print_cov(p, size, _PILL_PRINT, 0, 0.15 * size))
    bg = _background(rng, size, (0.07, 0.07, 0.08))
    return Scene(_lerp(bg, body, cov), cov, bg)


def _sample_ic(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.025, math.radians(3))
    p.update(
        code=f"{rng.integers(10000):04d}",
        board=_jitter(rng, (0.13, 0.36, 0.22), 0.03),
        print={"text": "CCNF", "dx": 0.0, "dy": 0.0, "contrast": 1.0, "ghost": None},
        missing_pins=[],
        seed=int(rng.integers(2**31)),
    )
    return p


def _render_ic(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    half_l, half_w = 0.27 * size, 0.16 * size
    board = _background(rng, size, tuple(p["board"]))
    # tinned pads and a silkscreen outline on the board
    pitch = 2 * half_l / 7
    pad_col = np.round(a / pitch + 3.0)
    in_row = (np.abs(pad_col) <= 6) & (pad_col >= 0)
    pad_a = np.abs(a - (pad_col - 3.0) * pitch)
    pad = in_row * _cover(
        np.minimum(0.32 * pitch - pad_a, 0.035 * size - np.abs(np.abs(b) - half_w - 0.05 * size))
    )
    img = _lerp(board, (0.72, 0.72, 0.68), pad.astype(np.float32))
    silk = _cover(
        1.0 * k
        - np.abs(np.maximum(np.abs(a) - half_l - 0.03 * size, np.abs(b) - half_w - 0.1 * size))
    )
    img = _lerp(img, (0.85, 0.86, 0.82), silk)
    # gull-wing pins: 7 per long side
    pin_idx = pad_col + np.where(b > 0, 7, 0)
    pin = in_row * _cover(
        np.minimum(0.2 * pitch - pad_a, 0.05 * size - np.abs(np.abs(b) - half_w - 0.035 * size))
    )
    for i in p["missing_pins"]:
        pin = np.where(pin_idx == i, 0.0, pin)
    pin_shade = 0.78 - 0.2 * np.abs(np.abs(b) - half_w - 0.035 * size) / (0.05 * size)
    img = _lerp(img, _gray(pin_shade.astype(np.float32)), pin.astype(np.float32))
    body = _cover(np.minimum(half_l - np.abs(a), half_w - np.abs(b)))
    dimple = _cover(0.018 * size - np.hypot(a + half_l - 0.05 * size, b - half_w + 0.05 * size))
    shade = 0.1 + 0.015 * _noise(rng, size, 0.7 * k) + 0.03 * dimple
    chip = _colour(shade.astype(np.float32), (0.95, 0.95, 1.0))
    chip = _lerp(chip, (0.55, 0.55, 0.56), _print_cov(p, size, 0.085, 0, -0.05 * size))
    code = dict(p, print={"text": p["code"], "dx": 0.0, "dy": 0.0, "contrast": 1.0, "ghost": None})
    chip = _lerp(chip, (0.5, 0.5, 0.52), _print_cov(code, size, 0.07, 0, 0.06 * size))
    img = _lerp(img, chip, body)
    fg = np.maximum(body, pin).astype(np.float32)
    return Scene(img, fg, board)


def _alter_ic(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    if kind == "misprint":
        return _alter_print(kind, p, rng, size)
    q = dict(p)
    first = int(rng.integers(14))
    q["missing_pins"] = [first] + ([first + 1] if rng.uniform() < 0.3 and first % 7 < 6 else [])
    return q


def _sample_gear(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.pi)
    p.update(
        teeth=16,
        colour=_jitter(rng, (0.90, 0.86, 0.74), 0.04),
        broken=[],
        seed=int(rng.integers(2**31)),
    )
    return p


def _render_gear(p: Params, size: int) -> Scene:
    k = size / 256
    rng = np.random.default_rng(p["seed"])
    rho, phi = _polar(size, p["cx"], p["cy"])
    n = p["teeth"]
    t = (phi - p["angle"]) * n / (2 * np.pi)
    tooth = np.round(t)
    frac = np.abs(t - tooth)  # 0 at a tooth's centre, 0.5 in a gap
    profile = np.clip((0.42 - frac) / 0.14, 0, 1)  # trapezoidal tooth
    for i in p["broken"]:
        hit = np.mod(tooth, n) == i[0]
        profile = np.where(hit, profile * i[1], profile)
    r_root, r_tip = 0.31 * size, 0.38 * size
    r_edge = r_root + (r_tip - r_root) * profile
    cov = _cover(r_edge - rho)
    hub = 0.065 * size
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    keyway = _cover(np.minimum(0.015 * size - np.abs(b), a - 0.0))
    cov = (
        cov
        * np.clip(_cover(rho - hub) + 0.0, 0, 1)
        * (1 - keyway * _cover(hub + 0.02 * size - rho))
    )
    for j in range(5):
        ang = p["angle"] + 2 * math.pi * j / 5 + math.pi / 5
        hx, hy = p["cx"] + 0.2 * size * math.cos(ang), p["cy"] + 0.2 * size * math.sin(ang)
        yy, xx = _grid(size)
        cov = cov * _cover(np.hypot(xx - hx, yy - hy) - 0.055 * size)
    rim = np.exp(-(((rho - r_root + 4 * k) / (2.0 * k)) ** 2))
    value = 0.9 - 0.1 * rim + 0.05 * np.cos(phi + 0.8) + 0.02 * _noise(rng, size, 1.0 * k)
    body = _colour(value.astype(np.float32), p["colour"])
    bg = _background(rng, size, (0.16, 0.16, 0.16))  # the washer's conveyor
    return Scene(_lerp(bg, body, cov), cov, bg)


def _alter_gear(kind: str, p: Params, rng: np.random.Generator, size: int) -> Params:
    q = dict(p)
    first = int(rng.integers(p["teeth"]))
    broken = [(first, rng.uniform(0.0, 0.45))]
    if rng.uniform() < 0.25:
        broken.append(((first + 1) % p["teeth"], rng.uniform(0.0, 0.6)))
    q["broken"] = broken
    return q


_SPECS: dict[str, _Spec] = {
    "weave": _Spec(_sample_weave, _render_weave, _alter_weave, ("misprint",), 1.2, 1.2),
    "twill": _Spec(
        lambda r, s: _sample_weave(r, s, twill=True),
        _render_weave,
        _alter_weave,
        ("misprint",),
        1.3,
        1.3,
    ),
    "mesh": _Spec(_sample_mesh, _render_mesh, _alter_mesh, contrast=1.4, scale=1.5),
    "perforated": _Spec(
        _sample_perforated, _render_perforated, _alter_perforated, contrast=1.2, scale=1.2
    ),
    "granite": _Spec(_sample_stone, _render_stone, _alter_inlay, ("noise_patch",), 1.8, 1.7),
    "terrazzo": _Spec(
        lambda r, s: _sample_stone(r, s, terrazzo=True),
        _render_stone,
        _alter_inlay,
        ("noise_patch",),
        1.8,
        1.7,
    ),
    "brushed": _Spec(_sample_brushed, _render_brushed, _alter_brushed, ("hole",), 0.7, 1.0),
    "oak": _Spec(_sample_oak, _render_oak, contrast=1.5, scale=1.4),
    "hide": _Spec(_sample_hide, _render_hide, contrast=1.3, scale=1.3),
    "washer": _Spec(_sample_washer, _render_washer, _alter_washer),
    "hexnut": _Spec(_sample_hexnut, _render_hexnut, _alter_hexnut),
    "caplet": _Spec(_sample_caplet, _render_caplet, _alter_print),
    "tablet": _Spec(_sample_tablet, _render_tablet, _alter_print),
    "ic": _Spec(_sample_ic, _render_ic, _alter_ic),
    "gear": _Spec(_sample_gear, _render_gear, _alter_gear),
}


# --------------------------------------------------------------------------------------------
# painted defects: each returns (image, mask) for a clean scene


def _pick_centre(
    rng: np.random.Generator, scene: Scene, margin: float
) -> tuple[float, float] | None:
    """A random point at least ``margin`` px inside the part and the image border."""
    size = scene.fg.shape[0]
    inside = ndimage.distance_transform_edt(np.pad(scene.fg > 0.5, 1))[1:-1, 1:-1]
    ok = np.flatnonzero(inside.ravel() > margin)
    if ok.size == 0:
        return None
    idx = int(ok[rng.integers(ok.size)])
    return float(idx // size) + 0.5, float(idx % size) + 0.5


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
    field = 1 - np.hypot(u, v) + rough * _noise(rng, size, max(radius / 3, 1.0))
    return _smoothstep(-0.15, 0.15, field)


def _scratch(scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    centre = _pick_centre(rng, scene, 6 * k)
    if centre is None:
        return scene.img, np.zeros((size, size), np.float32)
    cy, cx = centre
    length = rng.uniform(0.12, 0.4) * size * spec.scale
    ang = rng.uniform(0, math.pi)
    bend = rng.uniform(-0.3, 0.3) * length
    t = np.linspace(-0.5, 0.5, int(length * 3) + 2)
    ex, ey = math.cos(ang), math.sin(ang)
    px = cx + ex * t * length - ey * bend * (1 - 4 * t * t)
    py = cy + ey * t * length + ex * bend * (1 - 4 * t * t)
    line = np.zeros((size, size), bool)
    ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    line[py[ok].astype(int), px[ok].astype(int)] = True
    width = rng.uniform(2.5, 5.0) * k
    dist = ndimage.distance_transform_edt(~line)
    alpha = _cover(width / 2 - dist.astype(np.float32)) * (scene.fg > 0.5)
    target = 1.0 if rng.uniform() < 0.6 else 0.0
    strength = (0.25 + 0.55 * sev) * spec.contrast
    img = _lerp(scene.img, np.full(3, target), alpha * min(strength, 1.0))
    return img, alpha


def _hole(scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    radius = rng.uniform(4.0, 13.0) * k * spec.scale
    centre = _pick_centre(rng, scene, radius + 3 * k)
    if centre is None:
        return scene.img, np.zeros((size, size), np.float32)
    cy, cx = centre
    inside = _blob(rng, size, cy, cx, radius, 0.12)
    yy, xx = _grid(size)
    # the cavity is darker on the side facing the light (upper left)
    grad = np.clip(((xx - cx) + (yy - cy)) / (2 * radius), -1, 1)
    depth = min((0.45 + 0.5 * sev) * spec.contrast, 0.95)
    if scene.bg is not None and rng.uniform() < 0.5:
        cavity = scene.bg  # a through-hole shows what lies behind the part
    else:
        cavity = scene.img * (1 - depth * (0.8 - 0.2 * grad))[..., None]
    img = _lerp(scene.img, cavity, inside)
    # a raised burr around the hole
    ring = np.clip(_smoothstep(0.0, 0.5, _blob_dilate(inside, 1.5 * k)) - inside, 0, 1)
    img = _lerp(img, np.ones(3), ring * 0.25 * depth)
    alpha = np.maximum(inside, ring) * (scene.fg > 0.5)
    return img, alpha


def _blob_dilate(alpha: F32, px: float) -> F32:
    return ndimage.gaussian_filter(alpha, max(px, 0.5)) * 1.6


_STAINS = ((0.35, 0.22, 0.10), (0.55, 0.30, 0.12), (0.16, 0.15, 0.13), (0.82, 0.80, 0.70))


def _stain(scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    radius = rng.uniform(8, 28) * k * spec.scale
    centre = _pick_centre(rng, scene, radius * 0.6)
    if centre is None:
        return scene.img, np.zeros((size, size), np.float32)
    cy, cx = centre
    alpha = _blob(rng, size, cy, cx, radius, 0.3) * (scene.fg > 0.5)
    colour = np.asarray(_STAINS[int(rng.integers(len(_STAINS)))], np.float32)
    opacity = min((0.25 + 0.5 * sev) * spec.contrast, 0.95)
    img = _lerp(scene.img, colour, alpha * opacity)
    return img, alpha


def _noise_patch(
    scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec
) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    radius = rng.uniform(8, 26) * k * spec.scale
    centre = _pick_centre(rng, scene, radius * 0.7)
    if centre is None:
        return scene.img, np.zeros((size, size), np.float32)
    cy, cx = centre
    alpha = _blob(rng, size, cy, cx, radius, 0.15) * (scene.fg > 0.5)
    # a foreign texture with the local mean colour: only the structure is wrong
    local = ndimage.gaussian_filter(scene.img, (4 * k, 4 * k, 0))
    grain = _noise(rng, size, rng.uniform(0.6, 3.0) * k)
    tint = 1 + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    tex = local * (1 + rng.uniform(0.25, 0.5) * grain)[..., None] * tint
    mix = min((0.5 + 0.5 * sev) * spec.contrast, 1.0)
    img = _lerp(scene.img, np.clip(tex, 0, 1), alpha * mix)
    return img, alpha


def _cut_paste(
    scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec, donor: Scene
) -> tuple[F32, F32]:
    """Paste a rectangle of another image of the class (or of this one, elsewhere), rotated
    by a multiple of 90 degrees more often than not."""
    size = scene.fg.shape[0]
    source = donor if rng.uniform() < 0.5 else scene
    shrink = 1.0
    for _ in range(20):
        h = int(rng.uniform(0.08, 0.2) * size * spec.scale * shrink) + 2
        w = int(rng.uniform(0.08, 0.2) * size * spec.scale * shrink) + 2
        turns = int(rng.integers(1, 4)) if rng.uniform() < 0.6 else 0
        sh, sw = (h, w) if turns % 2 == 0 else (w, h)
        half = math.hypot(h, w) / 2 + 1
        dst = _pick_centre(rng, scene, half)
        src = _pick_centre(rng, source, half)
        if dst is None or src is None:
            shrink *= 0.8
            continue
        y0, x0 = int(dst[0] - h / 2), int(dst[1] - w / 2)
        y1, x1 = int(src[0] - sh / 2), int(src[1] - sw / 2)
        if source is scene and abs(y0 - y1) + abs(x0 - x1) < max(h, w):
            continue  # pasting a patch onto itself changes nothing
        patch = np.rot90(source.img[y1 : y1 + sh, x1 : x1 + sw], turns)
        img = scene.img.copy()
        img[y0 : y0 + h, x0 : x0 + w] = patch
        alpha = np.zeros((size, size), np.float32)
        alpha[y0 : y0 + h, x0 : x0 + w] = 1.0
        return img, alpha
    return scene.img, np.zeros((size, size), np.float32)


_PAINTERS: dict[str, Callable[[Scene, np.random.Generator, float, _Spec], tuple[F32, F32]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "noise_patch": _noise_patch,
}


# --------------------------------------------------------------------------------------------
# image synthesis


def _mix_up(cls: str, params: Params, scene: Scene, rng: np.random.Generator, size: int) -> Scene:
    """The sibling class's part where this class's part should be: same position and (where
    both have it) material, on this image's background; its rotation follows its own class's
    normal range. Mixed-up classes share their background, so the result is a normal image of
    the sibling class."""
    other = CLASS_INFO[cls].mix_up_with
    assert other is not None and scene.bg is not None
    foreign = _SPECS[other].sample(rng, size)
    for key in ("cx", "cy", "metal", "body", "n_speckles"):
        if key in foreign and key in params:
            foreign[key] = params[key]
    part = _SPECS[other].render(foreign, size)
    return Scene(_lerp(scene.bg, part.img, part.fg), part.fg, scene.bg)


def _finish(img: F32, rng: np.random.Generator, size: int, gray: bool) -> NDArray[np.uint8]:
    """Illumination (gain, colour cast, gradient) and sensor noise, then 8-bit quantisation."""
    yy, xx = _grid(size)
    gain = rng.uniform(0.9, 1.1)
    cast = np.ones(3, np.float32) if gray else rng.uniform(0.985, 1.015, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    slope = rng.uniform(0, 0.14)
    ramp = 1 + slope * ((xx / size - 0.5) * math.cos(ang) + (yy / size - 0.5) * math.sin(ang))
    out = img * (gain * ramp)[..., None] * cast
    if gray:
        out = out.mean(axis=-1, keepdims=True)
    out = out + rng.normal(0, 0.008, out.shape).astype(np.float32)
    q = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    return q[..., 0] if gray else q


def _image_rng(seed: int, cls: str, split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cls.encode()), _SPLIT_CODE[split], kind, index])


def synthesize(
    cls: str, size: int, rng: np.random.Generator, defect: str | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.bool_] | None]:
    """One image of class ``cls`` (uint8 (S, S, 3), or (S, S) for gray classes) and its mask.

    With ``defect`` None the image is normal and the mask is None; otherwise the mask is a
    non-empty bool (S, S) array of the defect's pixels.
    """
    if cls not in _SPECS:
        raise CcnfError(f"unknown synthetic class '{cls}'", fix=f"use one of {SYNTHETIC_CLASSES}")
    spec = _SPECS[cls]
    gray = CLASS_INFO[cls].colour == "gray"
    params = spec.sample(rng, size)
    scene = spec.render(params, size)
    if defect is None:
        return _finish(scene.img, rng, size, gray), None
    if defect not in CLASS_INFO[cls].defects:
        raise CcnfError(f"class '{cls}' has no defect kind '{defect}'")
    min_px = max(4, int(0.0004 * size * size))
    for _ in range(12):
        sev = float(rng.uniform())
        if defect == "mix_up":
            # the whole wrong part is the defect, and so is where the right part is missing
            changed = _mix_up(cls, params, scene, rng, size)
            mask = ndimage.binary_fill_holes((changed.fg > 0.5) | (scene.fg > 0.5))
            img = changed.img
        elif defect in spec.altered:
            assert spec.alter is not None
            changed = spec.render(spec.alter(defect, params, rng, size), size)
            diff = np.abs(changed.img - scene.img).max(axis=-1)
            mask = ndimage.binary_closing(diff > 0.04, iterations=1)
            if defect != "misprint":  # letters keep their counters; solid parts are filled
                mask = ndimage.binary_fill_holes(mask)
            img = changed.img
        else:
            if defect == "cut_paste":
                donor = spec.render(spec.sample(rng, size), size)
                img, alpha = _cut_paste(scene, rng, sev, spec, donor)
            else:
                img, alpha = _PAINTERS[defect](scene, rng, sev, spec)
            mask = alpha >= 0.5
        if int(mask.sum()) >= min_px:
            return _finish(img, rng, size, gray), mask
    raise RuntimeError(f"could not place a '{defect}' defect on class '{cls}' at size {size}")


def _defect_counts(cls: str, n_defect: int) -> list[tuple[str, int]]:
    """Spread ``n_defect`` images over the class's defect kinds (first kinds get the rest)."""
    kinds = CLASS_INFO[cls].defects
    base, extra = divmod(n_defect, len(kinds))
    return [(kind, base + (i < extra)) for i, kind in enumerate(kinds) if base + (i < extra)]


def _save_png(path: Path, array: NDArray[np.uint8]) -> None:
    # no text chunks, no timestamp: identical arrays give identical bytes
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _jobs(cfg: SyntheticConfig) -> list[tuple[str, str, str | None, int]]:
    jobs: list[tuple[str, str, str | None, int]] = []
    for cls in SYNTHETIC_CLASSES:
        jobs += [(cls, "train", None, i) for i in range(cfg.n_train)]
        jobs += [(cls, "test_good", None, i) for i in range(cfg.n_test_good)]
        for kind, n in _defect_counts(cls, cfg.n_test_defect):
            jobs += [(cls, "test_defect", kind, i) for i in range(n)]
    return jobs


def _write_one(root: Path, cfg: SyntheticConfig, job: tuple[str, str, str | None, int]) -> None:
    cls, split, defect, i = job
    kind = DEFECT_KINDS.index(defect) + 1 if defect else 0
    rng = _image_rng(cfg.seed, cls, split, kind, i)
    img, mask = synthesize(cls, cfg.image_size, rng, defect)
    name = f"{i:03d}.png"
    if split == "train":
        _save_png(root / cls / "train" / "good" / name, img)
    elif defect is None:
        _save_png(root / cls / "test" / "good" / name, img)
    else:
        assert mask is not None
        _save_png(root / cls / "test" / defect / name, img)
        _save_png(
            root / cls / "ground_truth" / defect / f"{i:03d}_mask.png",
            mask.astype(np.uint8) * np.uint8(255),
        )


def _write_chunk(
    root: Path, cfg: SyntheticConfig, jobs: list[tuple[str, str, str | None, int]]
) -> int:
    for job in jobs:
        _write_one(root, cfg, job)
    return len(jobs)


def generate(
    out_dir: Path, cfg: SyntheticConfig, *, progress: bool = True, workers: int | None = None
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (replaced atomically); return a summary.

    The summary maps each class to its image counts: ``{"train": n, "test_good": n,
    "defects": {kind: n}}``, plus the totals and the config used. ``workers`` processes share
    the work (default: up to 2, one for small sets); every image has its own seed, so the
    output does not depend on it.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    out_dir = Path(out_dir)
    jobs = _jobs(cfg)
    if workers is None:
        workers = 1 if len(jobs) < 300 else min(2, os.cpu_count() or 1)
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1
    chunks = [jobs[i : i + 25] for i in range(0, len(jobs), 25)]
    with atomic_path(out_dir) as tmp:
        for cls in SYNTHETIC_CLASSES:
            (tmp / cls / "train" / "good").mkdir(parents=True)
            (tmp / cls / "test" / "good").mkdir(parents=True)
            for kind, _ in _defect_counts(cls, cfg.n_test_defect):
                (tmp / cls / "test" / kind).mkdir(parents=True)
                (tmp / cls / "ground_truth" / kind).mkdir(parents=True)
        with Progress(
            TextColumn("generating synthetic data"),
            BarColumn(),
            MofNCompleteColumn(),
            disable=not progress,
            transient=True,
        ) as bar:
            task = bar.add_task("generate", total=len(jobs))
            if workers <= 1:
                for chunk in chunks:
                    bar.advance(task, _write_chunk(tmp, cfg, chunk))
            else:
                # fork: the workers only run numpy/scipy/PIL, and unlike spawn it does not
                # re-import the caller's __main__ (which need not be import-safe)
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    futures = [pool.submit(_write_chunk, tmp, cfg, c) for c in chunks]
                    for fut in futures:
                        bar.advance(task, fut.result())
    classes = {
        cls: {
            "kind": CLASS_INFO[cls].kind,
            "colour": CLASS_INFO[cls].colour,
            "train": cfg.n_train,
            "test_good": cfg.n_test_good,
            "defects": dict(_defect_counts(cls, cfg.n_test_defect)),
        }
        for cls in SYNTHETIC_CLASSES
    }
    return {
        "root": str(out_dir),
        "config": cfg.model_dump(),
        "n_classes": len(classes),
        "n_images": len(jobs),
        "classes": classes,
    }


# --------------------------------------------------------------------------------------------
# sample grid for the README


def render_sample_grid(root: Path, out_png: Path) -> Path:
    """A PNG grid: per class, two normal training images and three defective test images
    (different defect kinds where possible) with the mask outline drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    classes = [c for c in SYNTHETIC_CLASSES if (root / c).is_dir()]
    if not classes:
        raise CcnfError(f"no synthetic classes under {root}", fix="run the prepare stage first")
    fig, axes = plt.subplots(len(classes), 5, figsize=(5 * 1.7, len(classes) * 1.8), dpi=72)
    axes = np.atleast_2d(axes)
    for row, cls in enumerate(classes):
        info = CLASS_INFO[cls]
        train = sorted((root / cls / "train" / "good").glob("*.png"))[:2]
        kinds = [d.name for d in sorted((root / cls / "test").iterdir()) if d.name != "good"]
        kinds = sorted(kinds, key=lambda d: info.defects.index(d) if d in info.defects else 99)
        picks: list[tuple[Path, Path | None, str]] = [(p, None, "normal") for p in train]
        for j in range(3):
            if not kinds:
                break
            kind = kinds[j % len(kinds)]
            images = sorted((root / cls / "test" / kind).glob("*.png"))
            image = images[(j // len(kinds)) % len(images)]
            mask = root / cls / "ground_truth" / kind / f"{image.stem}_mask.png"
            picks.append((image, mask, kind))
        for col in range(5):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(picks):
                ax.axis("off")
                continue
            image, mask, label = picks[col]
            arr = np.asarray(Image.open(image))
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=255)
            if mask is not None and mask.is_file():
                ax.contour(
                    np.asarray(Image.open(mask)) > 127, levels=[0.5], colors="red", linewidths=0.8
                )
            ax.set_title(label, fontsize=7, pad=2)
            if col == 0:
                ax.set_ylabel(f"{cls}\n{info.kind}, {info.colour}", fontsize=8)
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return out_png
