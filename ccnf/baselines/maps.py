"""Pixel maps and image scores from per-level patch scores, as CCNF's ``nf`` score does them.

levels[l] (B, 1, H_l, W_l) -> bilinear upsample to ``data.mask_size`` -> mean over levels ->
Gaussian blur (``score.smoothing_sigma``) -> map (B, S, S); image score = ``score.pooling`` of
the map. Uses :func:`ccnf.scoring.gaussian_blur` and :func:`ccnf.scoring.pool`, so a baseline
and CCNF differ only in the patch scores.
"""

from __future__ import annotations

import numpy as np
import torch

from ccnf.baselines.base import PerClassModel
from ccnf.config import ScoreConfig
from ccnf.scoring import levels_to_map, pool


def anomaly_map(levels: list[torch.Tensor], size: int, sigma: float) -> torch.Tensor:
    """Per-level (B, 1, H_l, W_l) patch scores -> (B, size, size) smoothed map (CPU, float32)."""
    return levels_to_map([m.float().cpu() for m in levels], size, sigma)


@torch.no_grad()
def score_images(
    model: PerClassModel,
    features: list[torch.Tensor],
    cfg: ScoreConfig,
    mask_size: int,
    batch_images: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Score N images with one class's model.

    features[l]: (N, C_l, H_l, W_l). Returns (maps (N, S, S) float32, image scores (N,) float64).
    """
    n = features[0].shape[0]
    maps = []
    for start in range(0, n, batch_images):
        batch = [f[start : start + batch_images] for f in features]
        maps.append(anomaly_map(model.patch_scores(batch), mask_size, cfg.smoothing_sigma))
    out = torch.cat(maps).numpy().astype(np.float32)
    return out, pool(out, cfg)
