"""CCNF's patch scores and class-selection statistics: the flow passes behind its scores.

For an image of class y, per level l with grid H_l x W_l (see :mod:`ccnf.scoring` for how
the map scores become maps and image scores):

* nf patch score     = -log p(x_p | y) / D_l
* latent patch score = 0.5 ||z_p - mu||^2 / D_l, mu the prior mean (0, or mu_y under the
  class-mixture prior): the Gaussian term of -log p without the log-det
* proto patch score  = ||z_p - mu_{y,l}||^2 / D_l
* proto image score  = mean_l ||zbar_l - mu_{y,l}||^2 / D_l, zbar_l = spatial mean of z

Class selection statistics (:func:`class_statistics`): the image log-likelihood
``mean_l mean_p log p(x_p|y)/D_l`` and the prototype distance ``mean_l ||zbar_l(y) -
mu_{y,l}||^2/D_l`` of every image under every candidate class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ccnf.flows.ccnf import CCNF, LevelOutput
from ccnf.flows.gaussian import half_sq_norm
from ccnf.names import MAP_SCORES
from ccnf.patch_scores import PatchScores


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
) -> PatchScores:
    """One flow pass per level over all patches of images ``sl`` under classes y_img (b,)."""
    b = sl.stop - sl.start
    levels: dict[str, list[torch.Tensor]] = {s: [] for s in MAP_SCORES}
    img_lv = []
    for lvl, feat in enumerate(features):
        _, d, h, w = feat.shape
        out, mu = _level_forward(model, feat, lvl, sl, y_img)
        z = out.z.view(b, h * w, d)
        levels["nf"].append((-out.log_prob / d).view(b, 1, h, w).cpu())
        latent = half_sq_norm(out.z_centered) / d
        levels["latent"].append(latent.view(b, 1, h, w).cpu())
        levels["proto"].append(((z - mu[:, None]).pow(2).sum(-1) / d).view(b, 1, h, w).cpu())
        img_lv.append(((z.mean(dim=1) - mu).pow(2).sum(-1) / d).cpu())
    return PatchScores(levels, torch.stack(img_lv).mean(dim=0))


@torch.no_grad()
def patch_scores(
    model: CCNF, features: list[torch.Tensor], class_ids: torch.Tensor, batch_images: int
) -> PatchScores:
    """Per-level patch scores of N images, image i under class class_ids[i].

    features[l]: (N, D_l, H_l, W_l) cached features; class_ids: (N,). Every patch of a batch
    of ``batch_images`` images goes through each level's flow in one pass.
    """
    model.eval()
    n = features[0].shape[0]
    parts = [
        _batch_patches(model, features, slice(s, min(n, s + batch_images)),
                       class_ids[s : min(n, s + batch_images)])
        for s in range(0, n, batch_images)
    ]
    return PatchScores.cat(parts)


def calibration_patches(
    model: CCNF, features: list[torch.Tensor], class_id: int, batch_images: int
) -> dict[str, Any]:
    """What a checkpoint stores to calibrate one class: the patch scores of its M held-out
    normal training images under the model of the moment the class was learned.

    features[l]: (M, D_l, H_l, W_l). Returns :meth:`PatchScores.to_record`: {"nf": [(M, 1,
    H_l, W_l)], "latent": [...], "proto": [...], "proto_image": (M,)}. Keeping patch scores
    rather than statistics makes the train stage independent of ``score.*``:
    :func:`calibration_record` derives the statistics for whatever pooling, fusion, smoothing
    and proto power the evaluation uses.
    """
    ids = torch.full((features[0].shape[0],), class_id)
    return patch_scores(model, features, ids, batch_images).to_record()




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
