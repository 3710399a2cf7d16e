"""PaDiM-like Gaussian baseline: scores equal a direct numpy Mahalanobis computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccnf.baselines import GaussianModel
from ccnf.config import TrainConfig
from ccnf.errors import CcnfError

CHANNELS = [5, 3]
GRIDS = [[3, 2], [2, 2]]


def _feats(n: int, seed: int, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, (h, w) in zip(CHANNELS, GRIDS, strict=True):
        # correlated channels and a per-position offset, so mean and covariance both matter
        mix = torch.randn(c, c, generator=g)
        x = torch.randn(n, h * w, c, generator=g) @ mix * scale + torch.randn(h * w, c, generator=g)
        out.append(x.permute(0, 2, 1).reshape(n, c, h, w).contiguous())
    return out


def _numpy_mahalanobis(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """train (N, C, H, W), test (B, C, H, W) -> (B, H, W) distances, one position at a time."""
    _, c, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            xs = train[:, :, i, j].astype(np.float64)
            mu = xs.mean(axis=0)
            cov = np.cov(xs, rowvar=False, ddof=1) + eps * np.eye(c)
            inv = np.linalg.inv(cov)
            for b in range(test.shape[0]):
                d = test[b, :, i, j] - mu
                out[b, i, j] = d @ inv @ d
    return out


def _numpy_logdet(train: np.ndarray, eps: float) -> np.ndarray:
    """log det Sigma_p per position (H, W), numpy."""
    _, c, h, w = train.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            cov = np.cov(train[:, :, i, j].astype(np.float64), rowvar=False, ddof=1)
            out[i, j] = np.linalg.slogdet(cov + eps * np.eye(c))[1]
    return out


@pytest.mark.parametrize("n_train", [4, 12])  # 4 < C: rank-deficient, only the ridge saves it
@pytest.mark.parametrize("eps", [0.01, 0.5])
def test_scores_equal_direct_mahalanobis(n_train: int, eps: float) -> None:
    train, test = _feats(n_train, 0), _feats(3, 1)
    model = GaussianModel(CHANNELS, GRIDS, eps=eps)
    assert model.fit(train, TrainConfig(), torch.Generator()) == []
    scores = model.patch_scores(test)
    for lvl, (tr, te) in enumerate(zip(train, test, strict=True)):
        c = CHANNELS[lvl]
        m2 = _numpy_mahalanobis(tr.numpy(), te.numpy(), eps)
        latent = scores["latent"][lvl]
        assert latent.shape == (3, 1, *GRIDS[lvl])
        # latent = half the squared Mahalanobis distance per dimension
        np.testing.assert_allclose(latent[:, 0].numpy(), 0.5 * m2 / c, rtol=2e-4, atol=1e-4)
        # nf = -log N(x; mu_p, Sigma_p) / C
        nf = 0.5 * m2 / c + 0.5 * _numpy_logdet(tr.numpy(), eps) / c + 0.5 * np.log(2 * np.pi)
        np.testing.assert_allclose(scores["nf"][lvl][:, 0].numpy(), nf, rtol=2e-4, atol=2e-4)


def test_fp16_cache_input_and_training_mean_scores_low() -> None:
    train = _feats(30, 2)
    model = GaussianModel(CHANNELS, GRIDS, eps=0.01)
    model.fit([f.half() for f in train], TrainConfig(), torch.Generator())
    normal = model.patch_scores([f.half() for f in _feats(4, 3)])
    shifted = model.patch_scores([f + 30.0 for f in _feats(4, 3)])
    for a, b in zip(normal["latent"], shifted["latent"], strict=True):
        assert a.dtype == torch.float32
        assert (b.mean() > 3 * a.mean()).item()


def test_fit_is_deterministic_and_counts_its_statistics() -> None:
    train = _feats(8, 4)
    a, b = GaussianModel(CHANNELS, GRIDS, eps=0.01), GaussianModel(CHANNELS, GRIDS, eps=0.01)
    a.fit(train, TrainConfig(), torch.Generator().manual_seed(0))
    b.fit(train, TrainConfig(), torch.Generator().manual_seed(99))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    want = sum(h * w * (c + c * c + 1) for c, (h, w) in zip(CHANNELS, GRIDS, strict=True))
    assert a.n_parameters() == want


def test_wrong_feature_shape_is_a_clear_error() -> None:
    model = GaussianModel(CHANNELS, GRIDS, eps=0.01)
    bad = _feats(4, 0)
    bad[1] = bad[1][:, :2]
    with pytest.raises(CcnfError, match="level 1 features have shape"):
        model.fit(bad, TrainConfig(), torch.Generator())
    with pytest.raises(CcnfError, match="2 feature levels"):
        model.patch_scores(bad[:1])
