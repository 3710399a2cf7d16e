"""The nine texture classes: sampler, renderer and (where a defect re-renders) alterer of
weave/twill, mesh, perforated, granite/terrazzo, brushed, oak and hide."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from ccnf.data.synthetic import portable as pm
from ccnf.data.synthetic._common import (
    F32,
    Params,
    _blob,
    _colour,
    _cover,
    _gray,
    _grid,
    _jitter,
    _lerp,
    _noise,
    _noise1d,
    _rotated,
    _rotated_point,
    _voronoi,
)
from ccnf.data.synthetic.scene import Scene


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
    prof_warp = pm.power(pm.sin(np.pi * fa), 0.6) * (0.78 + 0.22 * pm.sin(np.pi * fb))
    prof_weft = pm.power(pm.sin(np.pi * fb), 0.6) * (0.78 + 0.22 * pm.sin(np.pi * fa))
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
            d = pm.hypot(da, db)
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
    rim = pm.exp(-(((dist - r) / (1.4 * k)) ** 2))
    rim_light = rim * (-(dx + dy) / (pm.hypot(dx, dy) + 1e-3)) * 0.14
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
        plugged = pm.hypot(a - da - ca, b - db - cb) < pr * size
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
    img = pm.gaussian_filter(img, (0.6 * k, 0.6 * k, 0)).astype(np.float32)
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
        img = _punch(img, pm.hypot(xx - hx, yy - hy), xx - hx, yy - hy, r * k, k)
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
        d = pm.hypot(xx - p["knot"][0], (yy - p["knot"][1]) * 1.6)
        kr = p["knot_r"] * k
        # rings wrap around the knot; its core is dark
        r = r + 2.5 * pm.exp(-((d / (3 * kr)) ** 2)) + d / kr * pm.exp(-((d / (1.8 * kr)) ** 2))
        darken = 0.55 * _cover(kr - d)
    t = r - np.floor(r)
    late = pm.exp(-(((t - 0.8) / 0.1) ** 2))  # dark latewood band of every ring
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
    creases = pm.exp(-((n1 / p["crease"]) ** 2)) * 0.6 + pm.exp(-((n2 / 0.12) ** 2)) * 0.5
    # pebbles lit from the upper left: the derivative of the smooth field acts as shading
    gy, gx = np.gradient(pm.gaussian_filter(np.abs(n1), k))
    shade = 1 + 0.6 * (-gx - gy) / (k + 1e-3)
    mottle = 1 + 0.08 * _noise(rng, size, 24 * k)
    pores = 1 - 0.12 * (_noise(rng, size, 0.5 * k) > 2.2)
    value = np.clip(shade * mottle * pores * (1 - 0.45 * creases), 0.2, 1.6)
    return Scene(_colour(value.astype(np.float32), p["base"]), np.ones((size, size), np.float32))
