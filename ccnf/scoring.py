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
With ``score.calibrated`` (E9) nf and proto are standardised the same way.

Automatic thresholds (U-Flow, :func:`thresholds`): per class, mean + k*std and a percentile of
the class's calibration image scores.

Class selection (task-agnostic setting, :func:`select_classes`): each test image is scored under
argmax_y of the image log-likelihood ``mean_l mean_p log p(x_p|y)/D_l`` (``likelihood``) or
argmin_y of ``mean_l ||zbar_l(y) - mu_{y,l}||^2/D_l`` (``prototype``) over the seen classes.
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
from ccnf.flows.ccnf import CCNF, LevelOutput


@dataclass
class Scores:
    """Per-image scores of N images; maps are (N, S, S) float32, images (N,) float64.

    A per-class baseline has only the nf-type score: its proto entries are None, and every
    function below then returns the ``nf`` score alone (no proto, no hybrid).
    """

    nf_map: np.ndarray
    proto_map: np.ndarray | None
    nf_image: np.ndarray
    proto_image: np.ndarray | None


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


def levels_to_map(levels: list[torch.Tensor], size: int, sigma: float) -> torch.Tensor:
    """Per-level (B, 1, H_l, W_l) patch scores -> (B, size, size): upsample, average, blur."""
    up = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in levels]
    return gaussian_blur(torch.cat(up, dim=1).mean(dim=1), sigma)


@dataclass
class _BatchPatches:
    """Patch-level scores of b images under one class id each (float32).

    nf[l], proto[l]: (b, 1, H_l, W_l) per level; proto_image: (b,) mean over levels of
    ||zbar_l - mu_l||^2 / D_l (before ``proto_power``).
    """

    nf: list[torch.Tensor]
    proto: list[torch.Tensor]
    proto_image: torch.Tensor


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _level_forward(
    model: CCNF, feat: torch.Tensor, level: int, sl: slice, y_img: torch.Tensor
) -> tuple[LevelOutput, torch.Tensor]:
    """One flow pass over every patch of images ``sl`` of one level, image i under class
    y_img[i], on the model's device (``params.device``).

    feat: (N, D, H, W) cached features; y_img: (b,). Returns the LevelOutput of the b*H*W
    vectors (image-major) and the prototypes mu (b, D).
    """
    device = _device_of(model)
    b = sl.stop - sl.start
    _, d, h, w = feat.shape
    y_img = y_img.to(device)
    x = feat[sl].to(device).float().flatten(2).transpose(1, 2).reshape(b * h * w, d)
    out = model.forward_level(
        level, x, y_img.repeat_interleave(h * w), torch.arange(h * w, device=device).repeat(b)
    )
    return out, model.prototype(level, y_img)


def _batch_patches(
    model: CCNF, features: list[torch.Tensor], sl: slice, y_img: torch.Tensor
) -> _BatchPatches:
    """One flow pass per level over all patches of images ``sl`` under classes y_img (b,)."""
    b = sl.stop - sl.start
    nf_lv, pr_lv, img_lv = [], [], []
    for lvl, feat in enumerate(features):
        _, d, h, w = feat.shape
        out, mu = _level_forward(model, feat, lvl, sl, y_img)
        z = out.z.view(b, h * w, d)
        nf_lv.append((-out.log_prob / d).view(b, 1, h, w).cpu())
        pr_lv.append(((z - mu[:, None]).pow(2).sum(-1) / d).view(b, 1, h, w).cpu())
        img_lv.append(((z.mean(dim=1) - mu).pow(2).sum(-1) / d).cpu())
    return _BatchPatches(nf_lv, pr_lv, torch.stack(img_lv).mean(dim=0))


def _assemble(batches: list[_BatchPatches], cfg: ScoreConfig, mask_size: int) -> Scores:
    """Maps and image scores of N images from their batches' patch scores."""
    nf_maps = [levels_to_map(bp.nf, mask_size, cfg.smoothing_sigma).numpy() for bp in batches]
    proto_maps = [levels_to_map(bp.proto, mask_size, cfg.smoothing_sigma).numpy() for bp in batches]
    nf_map = np.concatenate(nf_maps).astype(np.float32)
    proto_image = np.concatenate([bp.proto_image.numpy() for bp in batches]).astype(np.float64)
    if cfg.proto_power == 1:
        proto_image = np.sqrt(np.maximum(proto_image, 0.0))
    return Scores(
        nf_map=nf_map,
        proto_map=np.concatenate(proto_maps).astype(np.float32),
        nf_image=pool(nf_map, cfg),
        proto_image=proto_image,
    )


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
    batches = []
    for start in range(0, n, batch_images):
        sl = slice(start, min(n, start + batch_images))
        batches.append(_batch_patches(model, features, sl, class_ids[sl]))
    return _assemble(batches, cfg, mask_size)


# -- calibration -------------------------------------------------------------------------------

# keys of one class's calibration record that hold [mean, std]
STAT_KEYS = ("nf_image", "proto_image", "nf_pixel", "proto_pixel")
# keys that hold the raw per-image calibration scores (the percentile threshold needs them)
VALUE_KEYS = ("nf_image_values", "proto_image_values")


def _mean_std(values: np.ndarray) -> list[float]:
    v = values.astype(np.float64).ravel()
    # population std (ddof=0), floored so that standardizing never divides by zero
    return [float(v.mean()), float(max(v.std(), 1e-12))]


def calibration_stats(scores: Scores) -> dict[str, list[float]]:
    """Calibration record of one class, from its M held-out normal training images.

    ``nf_image``, ``proto_image``, ``nf_pixel``, ``proto_pixel``: [mean, std] (std with
    ddof=0, floored at 1e-12) of the image scores (M,) and of all map pixels (M*S*S,).
    ``nf_image_values``, ``proto_image_values``: the M raw image scores themselves, which the
    percentile threshold of :func:`thresholds` needs (hybrid values follow from them).
    """
    return {
        "nf_image": _mean_std(scores.nf_image),
        "proto_image": _mean_std(scores.proto_image),
        "nf_pixel": _mean_std(scores.nf_map),
        "proto_pixel": _mean_std(scores.proto_map),
        "nf_image_values": [float(v) for v in scores.nf_image],
        "proto_image_values": [float(v) for v in scores.proto_image],
    }


def bank_calibration_stats(maps: np.ndarray, images: np.ndarray) -> dict[str, list[float]]:
    """Calibration record of one class of a per-class baseline (``model.kind`` != ccnf).

    maps: (M, S, S) anomaly maps and images: (M,) image scores of the M held-out normal
    training images. A baseline has only the nf-type score, so the record holds the ``nf_*``
    entries of :func:`calibration_stats` (no proto, hence no hybrid).
    """
    return {
        "nf_image": _mean_std(images),
        "nf_pixel": _mean_std(maps),
        "nf_image_values": [float(v) for v in np.asarray(images).ravel()],
    }


@torch.no_grad()
def calibration_patches(
    model: CCNF, features: list[torch.Tensor], class_id: int, batch_images: int
) -> dict[str, Any]:
    """What a checkpoint stores to calibrate one class: the patch scores of its M held-out
    normal training images under the model of the moment the class was learned.

    features[l]: (M, D_l, H_l, W_l). Returns {"nf": [(M, 1, H_l, W_l)], "proto": [...],
    "proto_image": (M,)} (float32, CPU). Keeping patch scores rather than statistics makes the
    train stage independent of ``score.*``: :func:`calibration_record` derives the statistics
    for whatever pooling, smoothing and proto power the evaluation uses.
    """
    model.eval()
    n = features[0].shape[0]
    batches = [
        _batch_patches(
            model, features, slice(s, min(n, s + batch_images)),
            torch.full((min(n, s + batch_images) - s,), class_id),
        )
        for s in range(0, n, batch_images)
    ]
    levels = range(len(features))
    return {
        "nf": [torch.cat([b.nf[lvl] for b in batches]).cpu() for lvl in levels],
        "proto": [torch.cat([b.proto[lvl] for b in batches]).cpu() for lvl in levels],
        "proto_image": torch.cat([b.proto_image for b in batches]).cpu(),
    }


def calibration_record(
    patches: dict[str, Any], cfg: ScoreConfig, mask_size: int, *, cls: str = "?",
    where: str | None = None,
) -> dict[str, list[float]]:
    """Statistics of one class (:func:`calibration_stats`, or :func:`bank_calibration_stats`
    for a baseline, whose record has no ``proto``) from its stored calibration patch scores."""
    if not isinstance(patches.get("nf"), list):
        raise CcnfError(
            f"the calibration record of class '{cls}' holds no patch scores: the checkpoint "
            "predates score-independent calibration",
            where=where,
            fix="re-train so the checkpoints store them: dvc repro",
        )
    if "proto" not in patches:
        maps = levels_to_map(patches["nf"], mask_size, cfg.smoothing_sigma).numpy()
        return bank_calibration_stats(maps, pool(maps, cfg))
    batch = _BatchPatches(patches["nf"], patches["proto"], patches["proto_image"])
    return calibration_stats(_assemble([batch], cfg, mask_size))


def stack_stats(calibration: dict[str, dict], names: list[str]) -> dict[str, np.ndarray]:
    """Per-image calibration: {key: (N, 2) [mean, std]} for images scored under classes names[i].

    Used when the images of one test set are scored under different (selected) classes.
    """
    return {
        key: np.array([calibration[n][key] for n in names], dtype=np.float64).reshape(-1, 2)
        for key in STAT_KEYS
        if key in calibration[names[0]]
    }


def standardize(values: np.ndarray, stats: Any) -> np.ndarray:
    """(values - mean) / std; stats is one [mean, std] or (N, 2) per image of values (N, ...)."""
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim == 1:
        return (values - s[0]) / s[1]
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values - s[:, 0].reshape(shape)) / s[:, 1].reshape(shape)


def _image_scores(
    nf_image: np.ndarray,
    proto_image: np.ndarray | None,
    stats: dict,
    alpha: float,
    calibrated: bool,
) -> dict[str, np.ndarray]:
    nf_z = standardize(nf_image, stats["nf_image"])
    if proto_image is None:
        return {"nf": nf_z if calibrated else nf_image}
    proto_z = standardize(proto_image, stats["proto_image"])
    hybrid = alpha * proto_z + (1 - alpha) * nf_z
    if calibrated:
        return {"nf": nf_z, "proto": proto_z, "hybrid": hybrid}
    return {"nf": nf_image, "proto": proto_image, "hybrid": hybrid}


def image_scores(
    scores: Scores, stats: dict, alpha: float, calibrated: bool = False
) -> dict[str, np.ndarray]:
    """{score name: (N,) image scores} for nf, proto and hybrid.

    hybrid = alpha * cal(proto) + (1 - alpha) * cal(nf), cal(v) = (v - mean) / std with the
    class's calibration statistics. ``stats`` is one class's record (every image scored under
    that class) or :func:`stack_stats` output (image i under its own class).

    ``calibrated`` (``score.calibrated``, E9): nf and proto are returned as cal(nf), cal(proto)
    too. Per class this is an increasing affine map, so under oracle selection it changes no
    per-class ranking metric (AUROC, AP, F1-max, pixel AUROC, AUPRO) and, since the automatic
    thresholds move with it (:func:`thresholds`), no per-class precision/recall/F1 either. It
    matters when the images of one test set are scored under different classes (task-agnostic
    selection: each image gets its selected class's mean/std) or when one threshold is shared
    by several classes.
    """
    return _image_scores(scores.nf_image, scores.proto_image, stats, alpha, calibrated)


def pixel_maps(
    scores: Scores, stats: dict, alpha: float, calibrated: bool = False
) -> dict[str, np.ndarray]:
    """{score name: (N, S, S) float32 maps} for nf, proto and hybrid (see :func:`image_scores`;
    maps use the ``*_pixel`` statistics)."""
    nf_z = standardize(scores.nf_map, stats["nf_pixel"])
    if scores.proto_map is None:
        return {"nf": nf_z.astype(np.float32) if calibrated else scores.nf_map}
    proto_z = standardize(scores.proto_map, stats["proto_pixel"])
    hybrid = (alpha * proto_z + (1 - alpha) * nf_z).astype(np.float32)
    if calibrated:
        return {"nf": nf_z.astype(np.float32), "proto": proto_z.astype(np.float32),
                "hybrid": hybrid}
    return {"nf": scores.nf_map, "proto": scores.proto_map, "hybrid": hybrid}


# -- automatic thresholds (U-Flow) ---------------------------------------------------------------


def calibration_image_scores(
    stats: dict, alpha: float, calibrated: bool, *, cls: str = "?", where: str | None = None
) -> dict[str, np.ndarray]:
    """{score name: (M,) image scores of the class's M calibration images}, in the same space as
    the test scores of :func:`image_scores` (same alpha, same ``calibrated``).

    Raises CcnfError for a checkpoint written before the raw values were stored.
    """
    # a baseline's record (no proto score) needs only the nf values
    needed = VALUE_KEYS if "proto_image" in stats else VALUE_KEYS[:1]
    missing = [k for k in needed if k not in stats]
    if missing:
        raise CcnfError(
            f"the calibration record of class '{cls}' has no raw per-image calibration scores "
            f"({', '.join(missing)}): the checkpoint predates automatic thresholds",
            where=where,
            fix="re-train so the checkpoints store them: dvc repro",
        )
    nf = np.asarray(stats["nf_image_values"], dtype=np.float64)
    proto = stats.get("proto_image_values")
    proto = None if proto is None else np.asarray(proto, dtype=np.float64)
    return _image_scores(nf, proto, stats, alpha, calibrated)


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


# -- class selection at test (task-agnostic setting) ---------------------------------------------


@dataclass
class ClassStatistics:
    """Image-level statistics of N images under each of C candidate classes.

    candidates: (C,) int64 class ids; log_lik: (N, C) float64,
    ``mean_l mean_p log p(x_p | y) / D_l`` (higher = more likely); proto_dist: (N, C) float64,
    ``mean_l ||zbar_l(y) - mu_{y,l}||^2 / D_l`` with zbar_l(y) the spatial mean of z under
    condition y (lower = closer).
    """

    candidates: np.ndarray
    log_lik: np.ndarray
    proto_dist: np.ndarray

    def statistic(self, method: str) -> np.ndarray:
        """(N, C) statistic of ``method``, oriented so that the selected class is the argmax."""
        if method == "likelihood":
            return self.log_lik
        if method == "prototype":
            return -self.proto_dist
        raise ValueError(f"unknown class selection method {method!r}")

    def select(self, method: str) -> np.ndarray:
        """(N,) selected class ids (ties: the candidate listed first)."""
        return self.candidates[np.argmax(self.statistic(method), axis=1)]


@torch.no_grad()
def class_statistics(
    model: CCNF,
    features: list[torch.Tensor],
    candidates: torch.Tensor,
    batch_images: int,
    level: int | None = -1,
) -> ClassStatistics:
    """Selection statistics of N images under each of C candidate classes.

    features[l]: (N, D_l, H_l, W_l); candidates: (C,) class ids; ``level``
    (``score.select_level``): the feature level whose statistics decide (-1 the deepest),
    or None for the mean over all levels. One flow pass per candidate and per batch of
    ``batch_images`` images over all patches of that level at once. The deepest level is the
    most semantic and the cheapest (196 of the 980 patches per image by default), and the
    cost of selection is C passes, so it is the default.
    """
    model.eval()
    n = features[0].shape[0]
    cand = candidates.long()
    levels = range(len(features)) if level is None else [range(len(features))[level]]
    log_lik = np.zeros((n, cand.numel()))
    proto = np.zeros((n, cand.numel()))
    for start in range(0, n, batch_images):
        sl = slice(start, min(n, start + batch_images))
        b = sl.stop - sl.start
        for c in range(cand.numel()):
            y_img = torch.full((b,), int(cand[c]))
            ll, pd = [], []
            for lvl in levels:
                _, d, h, w = features[lvl].shape
                out, mu = _level_forward(model, features[lvl], lvl, sl, y_img)
                ll.append((out.log_prob / d).view(b, h * w).double().mean(dim=1).cpu())
                zbar = out.z.view(b, h * w, d).mean(dim=1)
                pd.append(((zbar - mu).pow(2).sum(-1) / d).double().cpu())
            log_lik[sl, c] = torch.stack(ll).mean(dim=0).numpy()
            proto[sl, c] = torch.stack(pd).mean(dim=0).numpy()
    return ClassStatistics(cand.numpy().astype(np.int64), log_lik, proto)


def select_classes(
    model: CCNF,
    features: list[torch.Tensor],
    candidates: torch.Tensor,
    method: str,
    batch_images: int,
    true_ids: torch.Tensor | None = None,
    level: int | None = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Class of each of N images for the task-agnostic setting (``score.class_select``).

    likelihood: argmax_y log-likelihood statistic; prototype: argmin_y prototype distance
    (see :class:`ClassStatistics`); oracle: ``true_ids`` (no flow pass; the statistic is then
    the one-hot (N, C) indicator of the true class). Returns (selected (N,) class ids,
    statistic (N, C) oriented so that selected = candidates[argmax]).
    """
    if method == "oracle":
        if true_ids is None:
            raise ValueError("oracle class selection needs true_ids")
        cand = candidates.numpy()
        truth = true_ids.numpy()
        return truth.astype(np.int64), (truth[:, None] == cand[None, :]).astype(np.float64)
    stats = class_statistics(model, features, candidates, batch_images, level)
    return stats.select(method), stats.statistic(method)
