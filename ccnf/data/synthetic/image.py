"""One image of a class and its defect mask (:func:`synthesize`): sample, render, damage
(painted, re-rendered with altered parameters, or mixed up), then illumination and sensor
noise."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ccnf.data.synthetic._common import F32, _grid
from ccnf.data.synthetic.classes import _SPECS, CLASS_INFO, SYNTHETIC_CLASSES
from ccnf.data.synthetic.defects import _PAINTERS, _cut_paste, _mix_up
from ccnf.errors import CcnfError

# --------------------------------------------------------------------------------------------
# image synthesis


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
