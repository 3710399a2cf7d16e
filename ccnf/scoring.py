"""Anomaly scores of a trained CCNF: ``nf``, ``proto`` and ``hybrid`` (DESIGN.md section 4).

For an image of (selected) class y, per level l with grid H_l x W_l:

* nf patch score   = -log p(x_p | y) / D_l
* proto patch score = ||z_p - mu_{y,l}||^2 / D_l     (the spatial reading of the proto score)
* proto image score = mean_l ||zbar_l - mu_{y,l}||^2 / D_l, zbar_l = spatial mean of z;
  with ``score.proto_power: 1`` its square root (E12-1 compares both)

Pixel maps: each level's patch scores are upsampled bilinearly to ``data.mask_size``,
averaged over levels and Gaussian-smoothed (``score.smoothing_sigma``, in mask pixels).
nf image score = ``score.pooling`` (max | mean | top-k mean) of the nf map.

hybrid = alpha * cal(proto) + (1 - alpha) * cal(nf), image- and pixel-wise, where cal()
standardises with the mean/std of the class's scores on held-out *training* images
(:func:`calibration_stats`), computed when the class is learned and stored with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ccnf.config import ScoreConfig
from ccnf.flows.ccnf import CCNF

SCORES = ("nf", "proto", "hybrid")


@dataclass
class Scores:
    """Per-image scores of N images; maps are (N, S, S) float32, images (N,) float64."""

    nf_map: np.ndarray
    proto_map: np.ndarray
    nf_image: np.ndarray
    proto_image: np.ndarray


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, S, S) maps, kernel radius ceil(4 sigma), reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(4 * sigma))
    radius = min(radius, maps.shape[-1] - 1)
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def pool(maps: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """Image score from (N, S, S) maps by ``score.pooling``."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    if cfg.pooling == "max":
        return flat.max(axis=1)
    if cfg.pooling == "mean":
        return flat.mean(axis=1)
    k = max(1, round(cfg.topk_ratio * flat.shape[1]))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def _to_map(levels: list[torch.Tensor], size: int, sigma: float) -> torch.Tensor:
    """Per-level (B, 1, H_l, W_l) patch scores -> (B, size, size): upsample, average, blur."""
    up = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in levels]
    return gaussian_blur(torch.cat(up, dim=1).mean(dim=1), sigma)


@torch.no_grad()
def score_images(
    model: CCNF,
    features: list[torch.Tensor],
    class_ids: torch.Tensor,
    cfg: ScoreConfig,
    mask_size: int,
    batch_images: int,
) -> Scores:
    """Score N images, each under its class id.

    features[l]: (N, D_l, H_l, W_l) cached features; class_ids: (N,). Every patch of a batch
    goes through each level's flow in one pass.
    """
    model.eval()
    n = features[0].shape[0]
    nf_maps, proto_maps, proto_img = [], [], []
    for start in range(0, n, batch_images):
        sl = slice(start, min(n, start + batch_images))
        b = sl.stop - sl.start
        y_img = class_ids[sl]
        nf_lv, pr_lv, img_lv = [], [], []
        for lvl, feat in enumerate(features):
            _, d, h, w = feat.shape
            x = feat[sl].float().flatten(2).transpose(1, 2).reshape(b * h * w, d)
            y = y_img.repeat_interleave(h * w)
            pos = torch.arange(h * w).repeat(b)
            out = model.forward_level(lvl, x, y, pos)
            mu = model.prototype(lvl, y_img)  # (b, d)
            z = out.z.view(b, h * w, d)
            nf_lv.append((-out.log_prob / d).view(b, 1, h, w))
            pr_lv.append(((z - mu[:, None]).pow(2).sum(-1) / d).view(b, 1, h, w))
            img_lv.append((z.mean(dim=1) - mu).pow(2).sum(-1) / d)
        nf_maps.append(_to_map(nf_lv, mask_size, cfg.smoothing_sigma).numpy())
        proto_maps.append(_to_map(pr_lv, mask_size, cfg.smoothing_sigma).numpy())
        proto_img.append(torch.stack(img_lv).mean(dim=0).numpy())
    nf_map = np.concatenate(nf_maps).astype(np.float32)
    proto_image = np.concatenate(proto_img).astype(np.float64)
    if cfg.proto_power == 1:
        proto_image = np.sqrt(np.maximum(proto_image, 0.0))
    return Scores(
        nf_map=nf_map,
        proto_map=np.concatenate(proto_maps).astype(np.float32),
        nf_image=pool(nf_map, cfg),
        proto_image=proto_image,
    )


def _mean_std(values: np.ndarray) -> list[float]:
    v = values.astype(np.float64).ravel()
    return [float(v.mean()), float(max(v.std(), 1e-12))]


def calibration_stats(scores: Scores) -> dict[str, list[float]]:
    """[mean, std] of each score on a class's held-out normal training images."""
    return {
        "nf_image": _mean_std(scores.nf_image),
        "proto_image": _mean_std(scores.proto_image),
        "nf_pixel": _mean_std(scores.nf_map),
        "proto_pixel": _mean_std(scores.proto_map),
    }


def _cal(values: np.ndarray, stats: list[float]) -> np.ndarray:
    return (values - stats[0]) / stats[1]


def image_scores(scores: Scores, stats: dict[str, list[float]], alpha: float) -> dict:
    """{score name: (N,) image scores} for nf, proto and hybrid."""
    hybrid = alpha * _cal(scores.proto_image, stats["proto_image"]) + (1 - alpha) * _cal(
        scores.nf_image, stats["nf_image"]
    )
    return {"nf": scores.nf_image, "proto": scores.proto_image, "hybrid": hybrid}


def pixel_maps(scores: Scores, stats: dict[str, list[float]], alpha: float) -> dict:
    """{score name: (N, S, S) maps} for nf, proto and hybrid."""
    hybrid = alpha * _cal(scores.proto_map, stats["proto_pixel"]) + (1 - alpha) * _cal(
        scores.nf_map, stats["nf_pixel"]
    )
    return {"nf": scores.nf_map, "proto": scores.proto_map, "hybrid": hybrid.astype(np.float32)}
