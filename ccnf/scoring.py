"""Anomaly scores of a trained model: ``nf``, ``latent``, ``proto``, ``hybrid`` (DESIGN.md 4).

For an image of (selected) class y, per level l with grid H_l x W_l:

* nf patch score     = -log p(x_p | y) / D_l
* latent patch score = 0.5 ||z_p - mu||^2 / D_l, mu the prior mean (0, or mu_y under the
  class-mixture prior): the Gaussian term of -log p without the log-det
* proto patch score  = ||z_p - mu_{y,l}||^2 / D_l     (the spatial reading of the proto score)
* proto image score  = mean_l ||zbar_l - mu_{y,l}||^2 / D_l, zbar_l = spatial mean of z;
  with ``score.proto_power: 1`` its square root (E12-1 compares both)

A per-class baseline gives nf and latent only (no prototype, hence no proto and no hybrid).

Pixel maps (:func:`levels_to_map`): each level's patch scores are upsampled bilinearly to
``data.mask_size``, fused over levels and Gaussian-smoothed (``score.smoothing_sigma``, in mask
pixels). Fusion (``score.level_fusion``): ``mean`` averages the raw levels; ``standardized``
first maps each level's scores to (s - m_l) / sd_l with m_l, sd_l the mean and std of the
class's calibration patch scores at that level (normal training patches only), so that a level
whose scores run on a larger scale does not decide the map alone; ``position`` maps the score
at position p to (s_p - m_{l,p}) / r_l, m_{l,p} the mean of the class's M calibration images
at p and r_l the std of the residuals s - m_{l,p} over all their patches of level l, so that a
place whose normal patches always score high (an edge, a fixed part of the layout) does not
set the image score of every normal image.
Image scores of nf and latent = ``score.pooling`` (max | mean | top-k mean) of their map.

hybrid = alpha * cal(proto) + (1 - alpha) * cal(nf), image- and pixel-wise, where cal()
standardises with the mean/std of the class's scores on held-out *training* images
(:func:`calibration_record`), computed when the class is learned and stored with the checkpoint.
With ``score.calibrated`` (E9) nf and proto are standardised the same way.

Automatic thresholds (U-Flow, :func:`thresholds`): per class, mean + k*std and a percentile of
the class's calibration image scores.

The patch scores themselves come from the model (:mod:`ccnf.models`: CCNF's flow passes in
:mod:`ccnf.models.ccnf_scores`, a baseline's per-class model), and so does the class selection of
the task-agnostic setting (``score.class_select``: each test image is scored under argmax_y of
the image log-likelihood ``mean_l mean_p log p(x_p|y)/D_l`` (``likelihood``) or argmin_y of
``mean_l ||zbar_l(y) - mu_{y,l}||^2/D_l`` (``prototype``) over the seen classes). This module
is the same for every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ccnf.config import ScoreConfig
from ccnf.errors import CcnfError
from ccnf.flows.ccnf import CCNF
from ccnf.models.ccnf_scores import patch_scores
from ccnf.names import MAP_SCORES
from ccnf.patch_scores import PatchScores


@dataclass
class Scores:
    """Scores of N images. maps[s] (N, S, S) float32 for every map score s present (nf,
    latent, proto for CCNF; nf, latent for a baseline); images[s] (N,) float64 image scores
    (pooled maps; proto's comes from the latent means instead)."""

    maps: dict[str, np.ndarray]
    images: dict[str, np.ndarray]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, S, S) maps, kernel radius ceil(4 sigma), reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(4 * sigma))
    radius = min(radius, maps.shape[-1] - 1)
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
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


@dataclass
class FusionStats:
    """What the level fusion reads for N images, each from the class it is scored under.

    levels[s]: (N, L, 2) [mean, std] of level l's calibration patch scores of score s
    (``standardized``); positions[s][l]: (N, 2, H_l, W_l) [mean of the calibration images at
    each position, residual std of the level at every position] (``position``), None where
    the records hold none.
    """

    levels: dict[str, np.ndarray]
    positions: dict[str, list[np.ndarray]] | None = None

    def per_level(self, score: str, fusion: str) -> list[np.ndarray] | None:
        """[(N, 2, h, w) mean/std per level] that ``fusion`` subtracts and divides by, h = w = 1
        for ``standardized``; None for ``mean``."""
        if fusion == "mean":
            return None
        if fusion == "standardized":
            return [lv[:, :, None, None] for lv in np.moveaxis(self.levels[score], 1, 0)]
        if self.positions is None:
            raise ValueError("position level fusion needs the calibration position stats")
        return self.positions[score]


def levels_to_map(
    levels: list[torch.Tensor],
    size: int,
    sigma: float,
    level_stats: list[np.ndarray] | None = None,
) -> torch.Tensor:
    """Per-level (B, 1, H_l, W_l) patch scores -> (B, size, size): normalize, upsample, fuse,
    blur.

    level_stats: None for the raw mean over levels (``level_fusion: mean``), or per level a
    (B, 2, h, w) [mean, std], h x w either 1 x 1 (``standardized``) or H_l x W_l
    (``position``): level l of image b becomes (s - mean) / std first (the statistics of the
    class each image is scored under).
    """
    up = []
    for lvl, m in enumerate(levels):
        m = m.float()
        if level_stats is not None:
            st = torch.as_tensor(level_stats[lvl], dtype=torch.float32)
            m = (m - st[:, 0:1]) / st[:, 1:2]
        up.append(F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
    return gaussian_blur(torch.cat(up, dim=1).mean(dim=1), sigma)


def level_statistics(patches: PatchScores) -> dict[str, list[list[float]]]:
    """{score: [[mean, std] per level]} of a class's calibration patch scores: every patch of
    its M held-out normal training images (std with ddof=0, floored at 1e-12)."""
    return {
        s: [_mean_std(lv.numpy()) for lv in levels] for s, levels in patches.levels.items()
    }


def position_statistics(patches: PatchScores) -> dict[str, list[np.ndarray]]:
    """{score: [(2, H_l, W_l) per level]} of a class's calibration patch scores (M images):
    [0] the mean over the M images at each position, [1] the std (ddof=0, floored at 1e-12)
    of the residuals s - mean over all M x H_l x W_l patches, the same at every position.

    One std per level rather than per position: from the few calibration images of a class
    (M = 6 to 32 here) a per-position std is a noisy divisor that would blow up the score
    of any place where it happens to come out small.
    """
    out: dict[str, list[np.ndarray]] = {}
    for s, levels in patches.levels.items():
        out[s] = []
        for lv in levels:
            v = lv.numpy().astype(np.float64)[:, 0]  # (M, H, W)
            mean = v.mean(axis=0)
            std = max(float((v - mean).std()), 1e-12)
            out[s].append(np.stack([mean, np.full_like(mean, std)]))
    return out


def assemble(
    patches: PatchScores,
    cfg: ScoreConfig,
    mask_size: int,
    fusion_stats: FusionStats | None = None,
) -> Scores:
    """Maps and image scores of N images from their patch scores.

    fusion_stats: the calibration statistics of each image's class (:func:`fusion_stats_of`),
    needed unless ``score.level_fusion`` is mean (see :func:`levels_to_map`).
    """
    if cfg.level_fusion != "mean" and fusion_stats is None:
        raise ValueError(f"{cfg.level_fusion} level fusion needs the calibration statistics")
    maps, images = {}, {}
    for s, levels in patches.levels.items():
        stats = None if fusion_stats is None else fusion_stats.per_level(s, cfg.level_fusion)
        maps[s] = levels_to_map(levels, mask_size, cfg.smoothing_sigma, stats).numpy().astype(
            np.float32)
        images[s] = pool(maps[s], cfg)
    if patches.proto_image is not None:
        proto = patches.proto_image.numpy().astype(np.float64)
        images["proto"] = np.sqrt(np.maximum(proto, 0.0)) if cfg.proto_power == 1 else proto
    return Scores(maps, images)


def score_images(
    model: CCNF,
    features: list[torch.Tensor],
    class_ids: torch.Tensor,
    cfg: ScoreConfig,
    mask_size: int,
    batch_images: int,
    fusion_stats: FusionStats | None = None,
) -> Scores:
    """Maps and image scores of N images, image i under class class_ids[i]: :func:`assemble`
    of :func:`patch_scores` (fusion_stats: see :func:`assemble`)."""
    return assemble(patch_scores(model, features, class_ids, batch_images), cfg, mask_size,
                    fusion_stats)


def unit_fusion_stats(n: int, grids: list[tuple[int, int]],
                      names: tuple[str, ...] = MAP_SCORES) -> FusionStats:
    """Fusion statistics mean 0, std 1 for n images on levels of grids [(H_l, W_l)]: any
    fusion then does the same arithmetic as with real calibration statistics and equals the
    mean fusion (timing runs)."""
    unit = np.tile(np.array([0.0, 1.0]), (n, len(grids), 1))
    maps = [np.stack([np.zeros((n, h, w)), np.ones((n, h, w))], axis=1) for h, w in grids]
    return FusionStats({s: unit for s in names}, {s: maps for s in names})


# -- calibration -------------------------------------------------------------------------------


def _mean_std(values: np.ndarray) -> list[float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    # population std (ddof=0), floored so that standardizing never divides by zero
    return [float(v.mean()), float(max(v.std(), 1e-12))]


def calibration_record(
    patches: dict[str, Any], cfg: ScoreConfig, mask_size: int, *, cls: str = "?",
    where: str | None = None,
) -> dict[str, Any]:
    """Statistics of one class from its stored calibration patch scores (M normal images).

    ``levels``: {score: [[mean, std] per level]} of the raw patch scores (standardized level
    fusion); ``positions``: {score: [(2, H_l, W_l) per level]} (position level fusion, see
    :func:`position_statistics`); for every score s of the fused maps: ``s_image`` and
    ``s_pixel`` [mean, std] (ddof=0, floored at 1e-12) of the M image scores and of all M*S*S
    map pixels; ``s_image_values``: the M raw image scores (percentile thresholds). proto's
    image score is the latent-mean distance, not a pooled map.
    """
    missing = [s for s in ("nf", "latent") if not isinstance(patches.get(s), list)]
    if missing:
        raise CcnfError(
            f"the calibration record of class '{cls}' holds no {'/'.join(missing)} patch "
            "scores: the checkpoint predates this version's scores",
            where=where,
            fix="re-train so the checkpoints store them: dvc repro",
        )
    ps = PatchScores.from_record(patches)
    m = patches["nf"][0].shape[0]
    if cfg.level_fusion == "position" and m < 2:
        raise CcnfError(
            f"class '{cls}' has {m} calibration image(s): position level fusion needs at "
            "least 2 to tell a position's mean from its spread",
            where=where,
            fix="raise eval.calib_fraction (and re-train: dvc repro), or set "
            "score.level_fusion to standardized",
        )
    out: dict[str, Any] = {"levels": level_statistics(ps), "positions": position_statistics(ps)}
    scores = assemble(ps, cfg, mask_size, fusion_stats_of(stack_stats({cls: out}, [cls] * m)))
    for s, values in scores.images.items():
        out[f"{s}_image"] = _mean_std(values)
        out[f"{s}_image_values"] = [float(v) for v in values]
    for s, maps in scores.maps.items():
        out[f"{s}_pixel"] = _mean_std(maps)
    return out


def score_names(stats: dict[str, Any]) -> list[str]:
    """The score definitions a calibration record supports (hybrid needs nf and proto)."""
    names = [s for s in MAP_SCORES if f"{s}_image" in stats]
    if "proto" in names and "nf" in names:
        names.append("hybrid")
    return names


def stack_stats(calibration: dict[str, dict], names: list[str]) -> dict[str, np.ndarray]:
    """Per-image calibration for images scored under classes names[i]:
    {"<s>_image" | "<s>_pixel": (N, 2) [mean, std]}, {"levels/<s>": (N, L, 2)} and
    {"positions/<s>/<l>": (N, 2, H_l, W_l)}."""
    first = calibration[names[0]]
    out = {
        key: np.array([calibration[n][key] for n in names], dtype=np.float64).reshape(-1, 2)
        for key in first
        if key.endswith(("_image", "_pixel"))
    }
    for s in first["levels"]:
        out[f"levels/{s}"] = np.array(
            [calibration[n]["levels"][s] for n in names], dtype=np.float64
        )
    for s, levels in first.get("positions", {}).items():
        for lvl in range(len(levels)):
            out[f"positions/{s}/{lvl}"] = np.stack(
                [calibration[n]["positions"][s][lvl] for n in names]
            ).astype(np.float64)
    return out


def fusion_stats_of(stats: dict[str, np.ndarray]) -> FusionStats:
    """The level fusion's statistics out of :func:`stack_stats` output (for :func:`assemble`)."""
    levels = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("levels/")}
    keys = sorted((k.split("/")[1], int(k.split("/")[2]), k) for k in stats
                  if k.startswith("positions/"))
    positions: dict[str, list[np.ndarray]] = {}
    for s, _, k in keys:
        positions.setdefault(s, []).append(stats[k])
    return FusionStats(levels, positions or None)


def standardize(values: np.ndarray, stats: Any) -> np.ndarray:
    """(values - mean) / std; stats is one [mean, std] or (N, 2) per image of values (N, ...)."""
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim == 1:
        return (values - s[0]) / s[1]
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values - s[:, 0].reshape(shape)) / s[:, 1].reshape(shape)


def _combine(
    values: dict[str, np.ndarray], stats: dict, suffix: str, alpha: float, calibrated: bool
) -> dict[str, np.ndarray]:
    """Raw or calibrated values of each score plus hybrid = alpha cal(proto) + (1-alpha)
    cal(nf); suffix: "_image" or "_pixel" (which calibration statistics)."""
    cal = {s: standardize(v, stats[f"{s}{suffix}"]) for s, v in values.items()}
    out = dict(cal) if calibrated else dict(values)
    if "proto" in values and "nf" in values:
        out["hybrid"] = alpha * cal["proto"] + (1 - alpha) * cal["nf"]
    return out


def image_scores(
    scores: Scores, stats: dict, alpha: float, calibrated: bool = False
) -> dict[str, np.ndarray]:
    """{score name: (N,) image scores} for every score of ``scores`` plus hybrid.

    hybrid = alpha * cal(proto) + (1 - alpha) * cal(nf), cal(v) = (v - mean) / std with the
    class's calibration statistics. ``stats`` is one class's record (every image scored under
    that class) or :func:`stack_stats` output (image i under its own class).

    ``calibrated`` (``score.calibrated``, E9): every score is returned as cal(score). Per class
    this is an increasing affine map, so under oracle selection it changes no per-class
    ranking metric (AUROC, AP, F1-max, pixel AUROC, AUPRO) and, since the automatic
    thresholds move with it (:func:`thresholds`), no per-class precision/recall/F1 either. It
    matters when the images of one test set are scored under different classes (task-agnostic
    selection: each image gets its selected class's mean/std) or when one threshold is shared
    by several classes.
    """
    return _combine(scores.images, stats, "_image", alpha, calibrated)


def pixel_maps(
    scores: Scores, stats: dict, alpha: float, calibrated: bool = False
) -> dict[str, np.ndarray]:
    """{score name: (N, S, S) float32 maps} (see :func:`image_scores`; maps use the
    ``*_pixel`` statistics)."""
    out = _combine(scores.maps, stats, "_pixel", alpha, calibrated)
    return {s: v.astype(np.float32) for s, v in out.items()}


# -- automatic thresholds (U-Flow) ---------------------------------------------------------------


def calibration_image_scores(
    stats: dict, alpha: float, calibrated: bool, *, cls: str = "?", where: str | None = None
) -> dict[str, np.ndarray]:
    """{score name: (M,) image scores of the class's M calibration images}, in the same space as
    the test scores of :func:`image_scores` (same alpha, same ``calibrated``).

    Raises CcnfError for a checkpoint written before the raw values were stored.
    """
    names = [s for s in MAP_SCORES if f"{s}_image" in stats]
    missing = [f"{s}_image_values" for s in names if f"{s}_image_values" not in stats]
    if missing:
        raise CcnfError(
            f"the calibration record of class '{cls}' has no raw per-image calibration scores "
            f"({', '.join(missing)}): the checkpoint predates automatic thresholds",
            where=where,
            fix="re-train so the checkpoints store them: dvc repro",
        )
    values = {s: np.asarray(stats[f"{s}_image_values"], dtype=np.float64) for s in names}
    return _combine(values, stats, "_image", alpha, calibrated)


def thresholds(
    stats: dict,
    alpha: float,
    calibrated: bool,
    k: float,
    percentile: float,
    *,
    cls: str = "?",
    where: str | None = None,
) -> dict[str, dict[str, float]]:
    """Automatic image thresholds of one class from its training-normal calibration scores.

    For each score s with calibration image scores v (M,):
    ``kstd`` = mean(v) + k * std(v) (ddof=0), ``pct`` = np.percentile(v, percentile) (linear
    interpolation). An image is predicted anomalous when its score is >= the threshold.
    Returns {score name: {"kstd": t, "pct": t}}.
    """
    values = calibration_image_scores(stats, alpha, calibrated, cls=cls, where=where)
    return {
        name: {
            "kstd": float(v.mean() + k * v.std()),
            "pct": float(np.percentile(v, percentile)),
        }
        for name, v in values.items()
    }
