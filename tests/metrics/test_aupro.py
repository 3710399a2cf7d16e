"""AUPRO: closed-form cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ccnf.metrics import aupro


def _brute_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Direct definition: loop over distinct thresholds, compute PRO and FPR per threshold."""
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        overlaps = []
        for img, m in enumerate(masks):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            overlaps += [pred[img][lab == k].mean() for k in range(1, n + 1)]
        pros.append(float(np.mean(overlaps)))
        fprs.append(float((pred & normal).sum() / normal.sum()))
    fpr, pro = np.array(fprs), np.array(pros)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        i = np.flatnonzero(~keep)[0]
        y_lim = np.interp(fpr_limit, fpr[i - 1 : i + 1], pro[i - 1 : i + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x) / fpr_limit)


def _random_example(seed: int, n: int = 3, size: int = 12, decimals: int = 1):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for m in masks:
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 5, size=2)
            m[r : r + h, c : c + w] = True
    masks[0, 1, 1] = True  # at least one region
    maps = rng.random(masks.shape) + 0.6 * masks
    return masks, np.round(maps, decimals)  # rounding creates ties across classes


def test_perfect_map_scores_one() -> None:
    masks, _ = _random_example(0)
    maps = masks.astype(np.float32) * 0.5 + 0.25
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps, num_thresholds=50) == pytest.approx(1.0, abs=1e-12)


def test_constant_map() -> None:
    """A constant map has one threshold: the curve jumps from (0, 0) to (1, 1) (PRO 0 -> 1,
    FPR 0 -> 1), so the trapezoid up to L has area L^2 / 2 and the normalised value is L / 2."""
    masks, _ = _random_example(1)
    maps = np.full(masks.shape, 3.0)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.025, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.5, 1.0])
def test_matches_brute_force(seed: int, fpr_limit: float) -> None:
    masks, maps = _random_example(seed, decimals=1 if seed % 2 else 3)
    expected = _brute_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_regions_weighted_equally() -> None:
    """Two regions in one image: a big one fully detected, a small one missed.

    Scores: big region 1.0, small region 0.0, normal 0.5. Thresholds (descending):
    t=1.0: PRO 1/2 (big region only), FPR 0; t=0.5: PRO 1/2, FPR 1; t=0: PRO 1, FPR 1.
    So PRO = 0.5 on the whole [0, L] range regardless of the regions' sizes; pixel-weighted
    overlap would instead be 36/37.
    """
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:6, 0:6] = True  # 36 pixels
    mask[0, 9, 9] = True  # 1 pixel, not 8-connected to the big one
    amap = np.full(mask.shape, 0.5)
    amap[0, 0:6, 0:6] = 1.0
    amap[0, 9, 9] = 0.0
    assert aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)
    # Swap: the small region detected, the big one missed -> the same 0.5.
    amap2 = np.full(mask.shape, 0.5)
    amap2[0, 0:6, 0:6] = 0.0
    amap2[0, 9, 9] = 1.0
    assert aupro(mask, amap2) == pytest.approx(0.5, abs=1e-12)


def test_diagonal_neighbours_form_one_region() -> None:
    """8-connectivity: diagonal pixels are one region (4-connectivity would give two)."""
    mask = np.zeros((1, 5, 5), dtype=bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True
    amap = np.zeros(mask.shape)
    amap[0, 1, 1] = 1.0  # half of the single region detected at FPR 0
    # PRO: 0.5 on (0, L], then 1 only when FPR reaches 1 at t=0 (shared with all normals).
    # Curve: (0,0) -> (0,0.5) -> (1,1); area to 0.3 = 0.3*0.5 + 0.3^2/4; normalised 0.575.
    assert aupro(mask, amap) == pytest.approx(0.5 + 0.3 * 0.5 / 2, abs=1e-12)


def test_regions_do_not_connect_across_images() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 3, 3] = masks[1, 0, 0] = True  # would touch if images were stacked as a volume
    amap = np.zeros(masks.shape)
    amap[0, 3, 3] = 1.0
    # Two regions, one detected: PRO 0.5 until FPR = 1 -> same curve as the previous test.
    assert aupro(masks, amap) == pytest.approx(0.575, abs=1e-12)


def test_quantile_grid_approximates_exact() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[:, 8:16, 8:20] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=5e-3)
    assert 0.0 < exact < 1.0


def test_2d_input_is_one_image() -> None:
    masks, maps = _random_example(2)
    assert aupro(masks[0], maps[0]) == pytest.approx(aupro(masks[:1], maps[:1]), abs=1e-15)


def test_errors() -> None:
    with pytest.raises(ValueError, match="without anomalous regions"):
        aupro(np.zeros((2, 4, 4), dtype=bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="without normal pixels"):
        aupro(np.ones((1, 4, 4), dtype=bool), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.ones((1, 4, 4), dtype=bool), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(4, dtype=bool)[None], np.zeros((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.eye(4, dtype=bool)[None], np.full((1, 4, 4), np.nan))
