"""The six object classes: sampler, renderer and alterer of washer, hexnut, caplet, tablet,
ic and gear, with the pose, background, turned steel, pill coating and imprint they share."""

from __future__ import annotations

import math

import numpy as np

from ccnf.data.synthetic import portable as pm
from ccnf.data.synthetic._common import (
    F32,
    Params,
    _colour,
    _cover,
    _gray,
    _grid,
    _jitter,
    _lerp,
    _noise,
    _polar,
    _rotated,
)
from ccnf.data.synthetic.glyphs import _LOOKALIKE, _text
from ccnf.data.synthetic.scene import Scene


def _pose(rng: np.random.Generator, size: int, shift: float, rot: float) -> Params:
    return {
        "cx": size / 2 + rng.uniform(-shift, shift) * size,
        "cy": size / 2 + rng.uniform(-shift, shift) * size,
        "angle": rng.uniform(-rot, rot),
    }


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
    lathe = 0.03 * pm.sin(2 * np.pi * rho / (2.3 * k)) + 0.02 * _noise(rng, size, 0.7 * k)
    value = metal + 0.13 * pm.cos(2 * (phi - 0.7)) + lathe
    return (value + 0.22 * pm.exp(-((edge / (1.6 * k)) ** 2))).astype(np.float32)


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
        edge = np.minimum(edge, pm.hypot(xx - bx, yy - by) - rad * size)
    if p["flat"] is not None:
        # a flat ground onto the rim: locally the straight side of a hex nut
        ang, depth = p["flat"]
        proj = (xx - p["cx"]) * math.cos(ang) + (yy - p["cy"]) * math.sin(ang)
        edge = np.minimum(edge, outer - depth * size - proj)
    # key tab: a small tongue pointing into the bore at the washer's rotation angle
    tab = _cover(np.minimum(3.2 * k - np.abs(b), a - (inner - 0.045 * size))) * (a > 0)
    cov = _cover(edge) * np.maximum(_cover(rho - inner), tab)
    value = _turned_face(rng, size, rho, phi, p["metal"], edge)
    value = value + 0.16 * pm.exp(-(((rho - inner) / (1.4 * k)) ** 2))
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
            off = np.abs(pm.wrap_angle(phi - ang))
            edge = np.where(off < math.pi / 6, np.minimum(edge, rc - depth * size - rho), edge)
        else:  # broken off along a straight line
            edge = np.minimum(edge, rc - depth * size - (dx * math.cos(ang) + dy * math.sin(ang)))
    bore = p["bore"] * size
    cov = _cover(edge) * _cover(rho - bore)
    value = _turned_face(rng, size, rho, phi, p["metal"], edge)
    # the thread shows as fine dark rings just inside the bore's rim
    value = value + (rho < bore + 4 * k) * (0.12 * pm.sin(2 * np.pi * rho / (1.8 * k)) - 0.1)
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
    return np.clip(pm.gaussian_filter(speck, 0.8 * k) * 4, 0, 0.8).astype(np.float32)


def _pill_coating(rng: np.random.Generator, p: Params, text: str, sibling_text: str) -> Params:
    """Add the line's coating, speckle count and imprint to a pill's pose and shape ``p``."""
    p.update(
        body=_jitter(rng, _PILL_BODY, 0.025),
        n_speckles=int(rng.integers(25, 90)),
        print={"text": text, "dx": 0.0, "dy": 0.0, "contrast": 1.0, "ghost": None},
        sibling_text=sibling_text,
        bite=None,
        seed=int(rng.integers(2**31)),
    )
    return p


def _sample_caplet(rng: np.random.Generator, size: int) -> Params:
    p = _pose(rng, size, 0.03, math.radians(8))
    p.update(length=0.64 * rng.uniform(0.98, 1.02), width=0.30 * rng.uniform(0.98, 1.02))
    return _pill_coating(rng, p, "CF", "NF")


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
    d_axis = pm.hypot(np.clip(np.abs(a) - seg, 0, None), b)
    cov = _cover(half_w - d_axis)
    if p["bite"] is not None:
        ang, rad = p["bite"]
        # a chip out of the rim: the bite sits on the outline in direction ``ang``
        ex, ey = math.cos(ang), math.sin(ang)
        t = np.clip(ex * seg, -seg, seg)
        bx, by = t + ex * half_w, ey * half_w
        cov = cov * _cover(pm.hypot(a - bx, b - by) - rad * size)
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
    p["radius"] = 0.29 * rng.uniform(0.98, 1.02)
    return _pill_coating(rng, p, "NF", "CF")


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
        cov = cov * _cover(pm.hypot(xx - bx, yy - by) - rad * size)
    a, b = _rotated(size, p["angle"], p["cx"], p["cy"])
    dome = np.sqrt(np.clip(1 - (rho / radius) ** 2, 0, 1))
    bevel = pm.exp(-(((radius - rho) / (3 * k)) ** 2))
    shade = 0.7 + 0.3 * dome - 0.12 * bevel + 0.015 * _noise(rng, size, 0.8 * k)
    # score line across the tablet: dark groove with a lit upper edge
    groove = pm.exp(-((b / (1.3 * k)) ** 2)) * 0.3 - pm.exp(-(((b + 2 * k) / (1.0 * k)) ** 2)) * 0.1
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
    dimple = _cover(0.018 * size - pm.hypot(a + half_l - 0.05 * size, b - half_w + 0.05 * size))
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
        cov = cov * _cover(pm.hypot(xx - hx, yy - hy) - 0.055 * size)
    rim = pm.exp(-(((rho - r_root + 4 * k) / (2.0 * k)) ** 2))
    value = 0.9 - 0.1 * rim + 0.05 * pm.cos(phi + 0.8) + 0.02 * _noise(rng, size, 1.0 * k)
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
