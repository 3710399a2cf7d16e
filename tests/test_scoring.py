from __future__ import annotations

import numpy as np
import pytest
import torch

from ccnf.config import FlowConfig, ScoreConfig
from ccnf.flows import CCNF
from ccnf.scoring import (
    calibration_stats,
    gaussian_blur,
    image_scores,
    pixel_maps,
    pool,
    score_images,
)


def test_blur_keeps_constants_and_mass_centre() -> None:
    flat = torch.full((2, 16, 16), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 17, 17)
    spike[0, 8, 8] = 1.0
    out = gaussian_blur(spike, 1.5)[0]
    assert int(out.argmax()) == 8 * 17 + 8
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert gaussian_blur(spike, 0.0) is spike


def test_pooling_modes() -> None:
    maps = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10)
    assert pool(maps, ScoreConfig(pooling="max")).tolist() == [99.0, 199.0]
    assert pool(maps, ScoreConfig(pooling="mean")).tolist() == [49.5, 149.5]
    top = pool(maps, ScoreConfig(pooling="topk", topk_ratio=0.05))
    assert top.tolist() == [97.0, 197.0]  # mean of the 5 largest


def _scored(power: int = 2):
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4)
    model = CCNF([5, 7], [[4, 4], [2, 2]], cfg, n_classes=2)
    feats = [torch.randn(3, 5, 4, 4), torch.randn(3, 7, 2, 2)]
    sc = ScoreConfig(proto_power=power, smoothing_sigma=0.0)
    return model, feats, score_images(model, feats, torch.tensor([0, 1, 1]), sc, 8, 2)


def test_scores_match_direct_flow_evaluation() -> None:
    model, feats, s = _scored()
    assert s.nf_map.shape == (3, 8, 8) and s.proto_image.shape == (3,)
    # nf image score (max pooling, no smoothing) equals the worst patch after upsampling:
    # check the proto image score by hand instead, level by level
    want = []
    for i, y in enumerate([0, 1, 1]):
        per_level = []
        for lvl, f in enumerate(feats):
            d, h, w = f.shape[1:]
            x = f[i].flatten(1).t()
            out = model.forward_level(lvl, x, torch.full((h * w,), y), torch.arange(h * w))
            mu = model.prototype(lvl, torch.tensor([y]))[0]
            per_level.append(float((out.z.mean(0) - mu).pow(2).sum().detach() / d))
        want.append(np.mean(per_level))
    np.testing.assert_allclose(s.proto_image, want, rtol=1e-5)
    _, _, s1 = _scored(power=1)
    np.testing.assert_allclose(s1.proto_image, np.sqrt(want), rtol=1e-5)


def test_batching_does_not_change_scores() -> None:
    model, feats, s = _scored()
    again = score_images(model, feats, torch.tensor([0, 1, 1]),
                         ScoreConfig(smoothing_sigma=0.0), 8, 3)
    np.testing.assert_allclose(again.nf_map, s.nf_map, rtol=1e-5, atol=1e-6)


def test_hybrid_is_weighted_sum_of_calibrated_scores() -> None:
    _, _, s = _scored()
    stats = calibration_stats(s)
    img = image_scores(s, stats, alpha=0.3)
    z_nf = (s.nf_image - stats["nf_image"][0]) / stats["nf_image"][1]
    z_pr = (s.proto_image - stats["proto_image"][0]) / stats["proto_image"][1]
    np.testing.assert_allclose(img["hybrid"], 0.3 * z_pr + 0.7 * z_nf)
    maps = pixel_maps(s, stats, alpha=1.0)
    want = (s.proto_map - stats["proto_pixel"][0]) / stats["proto_pixel"][1]
    np.testing.assert_allclose(maps["hybrid"], want, rtol=1e-5, atol=1e-5)
