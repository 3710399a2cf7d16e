"""Patch scores of a per-class baseline, batched; maps come from :func:`ccnf.scoring.assemble`.

levels[l] (B, 1, H_l, W_l) -> bilinear upsample to ``data.mask_size`` -> level fusion ->
Gaussian blur (``score.smoothing_sigma``) -> map (B, S, S); image score = ``score.pooling`` of
the map: the same functions as CCNF's scores, so a baseline and CCNF differ only in the patch
scores.
"""

from __future__ import annotations

import torch

from ccnf.baselines.base import PerClassModel
from ccnf.patch_scores import PatchScores


@torch.no_grad()
def bank_patch_scores(
    model: PerClassModel, features: list[torch.Tensor], batch_images: int
) -> PatchScores:
    """Patch scores of N images under one class's model, in batches of ``batch_images``.

    features[l]: (N, C_l, H_l, W_l). Returns nf and latent per level (N, 1, H_l, W_l) on the
    CPU (no proto score: a baseline has no prototype).
    """
    n = features[0].shape[0]
    parts = []
    for start in range(0, n, batch_images):
        batch = [f[start : start + batch_images] for f in features]
        levels = model.patch_scores(batch)
        parts.append(PatchScores({s: [m.float().cpu() for m in lv] for s, lv in levels.items()}))
    return PatchScores.cat(parts)
