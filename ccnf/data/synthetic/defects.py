"""Defects: the painted ones (scratch, hole, stain, noise_patch, cut_paste), each returning
the damaged image and an alpha map whose half level is the mask, and the mix-up (the sibling
class's part in place of this class's part)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ccnf.data.synthetic import portable as pm
from ccnf.data.synthetic._common import (
    F32,
    Params,
    _blob,
    _cover,
    _grid,
    _lerp,
    _noise,
    _smoothstep,
)
from ccnf.data.synthetic.classes import _SPECS, CLASS_INFO
from ccnf.data.synthetic.scene import Scene, _Spec

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


def _untouched(scene: Scene) -> tuple[F32, F32]:
    """What a painter returns where the defect found no room: the clean image, an empty mask."""
    size = scene.fg.shape[0]
    return scene.img, np.zeros((size, size), np.float32)


def _blob_site(
    scene: Scene,
    rng: np.random.Generator,
    spec: _Spec,
    radius_range: tuple[float, float],
    reach: float,
    pad: float,
    rough: float,
) -> tuple[float, float, float, F32] | None:
    """A soft blob (:func:`_blob`, roughness ``rough``) for a painted defect: its radius drawn
    from ``radius_range`` px (at 256 px, times the class's scale), its centre at least
    ``reach`` radii plus ``pad`` px inside the part. Returns (cy, cx, radius, blob), or None
    where the part has no such room."""
    size = scene.fg.shape[0]
    k = size / 256
    radius = rng.uniform(*radius_range) * k * spec.scale
    centre = _pick_centre(rng, scene, reach * radius + pad * k)
    if centre is None:
        return None
    cy, cx = centre
    return cy, cx, radius, _blob(rng, size, cy, cx, radius, rough)


def _scratch(scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    centre = _pick_centre(rng, scene, 6 * k)
    if centre is None:
        return _untouched(scene)
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
    site = _blob_site(scene, rng, spec, (4.0, 13.0), 1.0, 3.0, 0.12)
    if site is None:
        return _untouched(scene)
    cy, cx, radius, inside = site
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
    return pm.gaussian_filter(alpha, max(px, 0.5)) * 1.6


_STAINS = ((0.35, 0.22, 0.10), (0.55, 0.30, 0.12), (0.16, 0.15, 0.13), (0.82, 0.80, 0.70))


def _stain(scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec) -> tuple[F32, F32]:
    site = _blob_site(scene, rng, spec, (8, 28), 0.6, 0.0, 0.3)
    if site is None:
        return _untouched(scene)
    alpha = site[3] * (scene.fg > 0.5)
    colour = np.asarray(_STAINS[int(rng.integers(len(_STAINS)))], np.float32)
    opacity = min((0.25 + 0.5 * sev) * spec.contrast, 0.95)
    img = _lerp(scene.img, colour, alpha * opacity)
    return img, alpha


def _noise_patch(
    scene: Scene, rng: np.random.Generator, sev: float, spec: _Spec
) -> tuple[F32, F32]:
    size = scene.fg.shape[0]
    k = size / 256
    site = _blob_site(scene, rng, spec, (8, 26), 0.7, 0.0, 0.15)
    if site is None:
        return _untouched(scene)
    alpha = site[3] * (scene.fg > 0.5)
    # a foreign texture with the local mean colour: only the structure is wrong
    local = pm.gaussian_filter(scene.img, (4 * k, 4 * k, 0))
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
    return _untouched(scene)


_PAINTERS: dict[str, Callable[[Scene, np.random.Generator, float, _Spec], tuple[F32, F32]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "noise_patch": _noise_patch,
}


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
