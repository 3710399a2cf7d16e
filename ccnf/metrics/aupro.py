"""Area under the per-region-overlap (PRO) curve, the MVTec AD segmentation metric.

Definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021): every
8-connected component of a ground-truth mask is a region r with n_r pixels. For a threshold t,

    PRO(t) = (1 / R) * sum_r |{p in r : s_p >= t}| / n_r      (mean overlap, regions equal weight)
    FPR(t) = |{p normal : s_p >= t}| / N_normal               (over all images together)

The curve (FPR(t), PRO(t)) for t from +inf down to -inf is integrated with the trapezoid rule
from FPR = 0 to ``fpr_limit`` (interpolated linearly at ``fpr_limit``) and divided by
``fpr_limit``, so a perfect detector scores 1.0.

Exact evaluation: PRO(t) is a sum of per-pixel weights 1 / (R * n_r) over anomalous pixels
with s >= t, and FPR(t) a count of normal ones, so after one sort both are cumulative sums read
at the end of each run of equal scores. Only pixels that can influence the curve below
``fpr_limit`` are sorted.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["aupro"]

# Connects the 8 in-plane neighbours but never across images: axis 0 indexes images.
_STRUCTURE_8_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8_IN_PLANE[1] = True


def _validate(
    masks: ArrayLike, maps: ArrayLike, fpr_limit: float
) -> tuple[NDArray[np.bool_], NDArray[np.floating]]:
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or m.shape != a.shape:
        raise ValueError(
            f"masks and maps must both have shape (N, H, W); got {np.shape(masks)} and "
            f"{np.shape(maps)}"
        )
    if m.dtype != np.bool_:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("masks must be binary (0/1 or bool)")
        m = m != 0
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError("anomaly maps contain NaN")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return m, a


def _integrate_to_limit(fpr: NDArray[np.float64], pro: NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under (fpr, pro) on [0, limit], divided by limit.

    ``fpr`` must be non-decreasing, start at 0 and exceed ``limit`` somewhere or end at it.
    Vertical steps (equal fpr) contribute zero width, as they should.
    """
    above = np.flatnonzero(fpr > limit)
    if above.size:
        i = int(above[0])  # fpr[i - 1] <= limit < fpr[i], and i >= 1 since fpr[0] = 0
        w = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        pro_at = pro[i - 1] + w * (pro[i] - pro[i - 1])
        fpr = np.append(fpr[:i], limit)
        pro = np.append(pro[:i], pro_at)
    return float(np.trapezoid(pro, fpr) / limit)


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see the module docstring).

    Args:
        masks: (N, H, W) ground truth, bool or 0/1; nonzero = anomalous. (H, W) is taken as N=1.
        maps: (N, H, W) anomaly maps, higher = more anomalous.
        fpr_limit: upper FPR integration bound in (0, 1]; 0.3 is the MVTec AD convention.
        num_thresholds: None (default) evaluates the curve exactly at every distinct score.
            An int evaluates it only at that many quantiles of all scores (approximate, like
            grid-based implementations); the curve still starts at (0, 0).

    Returns:
        AUPRO in [0, 1]; 1.0 for a map that ranks every anomalous pixel above every normal one.
        A constant map gives ``fpr_limit / 2`` (the curve is the straight line (0,0)-(1,1)).

    Raises:
        ValueError: on shape mismatch, NaN scores, a bad ``fpr_limit``, no anomalous region,
            or no normal pixel.

    Cost: O(P log P) time for P = N*H*W pixels, and a few length-P arrays of memory.
    """
    from scipy import ndimage  # imported here: readers of ccnf.metrics need not pay for scipy

    m, a = _validate(masks, maps, fpr_limit)
    labels, n_regions = ndimage.label(m, structure=_STRUCTURE_8_IN_PLANE)
    if n_regions == 0:
        raise ValueError(
            "AUPRO is undefined without anomalous regions: every ground-truth mask is empty"
        )
    labels = labels.ravel()
    scores = a.ravel()
    region_size = np.bincount(labels, minlength=n_regions + 1)
    n_normal = int(region_size[0])
    if n_normal == 0:
        raise ValueError("AUPRO is undefined without normal pixels: every mask pixel is anomalous")
    # Pixel weight in PRO: each region contributes 1/R in total, spread over its pixels.
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (n_regions * region_size[1:])

    grid = None
    if num_thresholds is not None:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
        grid = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, num_thresholds)))[::-1]

    # At or below the k-th largest normal score FPR >= k / N_normal > limit; one such point is
    # enough for the interpolation, so pixels below it never need sorting (most of them at the
    # usual limit of 0.3). k = floor(limit * N_normal) + 1 would do; +2 absorbs rounding in the
    # product.
    k = int(np.floor(fpr_limit * n_normal)) + 2
    cut = None
    if k <= n_normal:
        normal_scores = scores[labels == 0]
        cut = np.partition(normal_scores, n_normal - k)[n_normal - k]
        del normal_scores
        if grid is not None:
            # The first grid point at or below the cut must be exact, so cut there instead.
            cut = grid[grid <= cut][0]
    if cut is not None:
        keep = np.flatnonzero(scores >= cut)
        scores, labels = scores[keep], labels[keep]
        del keep

    order = np.argsort(scores)[::-1]
    s_sorted = scores[order]
    lab_sorted = labels[order]
    del order
    fp_cum = np.cumsum(lab_sorted == 0, dtype=np.int64)
    pro_cum = np.cumsum(weight[lab_sorted])
    del lab_sorted

    if grid is None:
        idx = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1)
    else:
        if cut is not None:
            grid = grid[grid >= cut]
        # Pixels with s >= t are the first count(s >= t) of the descending order.
        n_at_least = s_sorted.size - np.searchsorted(s_sorted[::-1], grid, side="left")
        n_at_least = n_at_least[n_at_least > 0]
        idx = n_at_least - 1

    fpr = np.concatenate(([0.0], fp_cum[idx] / n_normal))
    pro = np.concatenate(([0.0], pro_cum[idx]))
    return _integrate_to_limit(fpr, pro, fpr_limit)
