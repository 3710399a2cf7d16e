"""PaDiM-like floor: one Gaussian per class, level and patch position.

For level l and position p with training vectors x_{n,p} in R^{C_l} (n = 1..N images):
    mu_p    = mean_n x_{n,p}
    Sigma_p = sum_n (x_{n,p} - mu_p)(x_{n,p} - mu_p)^T / (N - 1) + eps * I
    m_p(x)^2 = (x - mu_p)^T Sigma_p^{-1} (x - mu_p)                 (squared Mahalanobis)
    latent(x_p) = 0.5 m_p(x_p)^2 / C_l
    nf(x_p) = -log N(x_p; mu_p, Sigma_p) / C_l = latent + (0.5 log det Sigma_p) / C_l
              + 0.5 log(2 pi)
latent ranks the patches of one position as PaDiM's Mahalanobis distance does; nf adds the
per-position log-volume, as a flow's -log p adds its log-det.
No training loop and no randomness. Unlike PaDiM there is no random channel subset: every
cached channel is kept (C_l is small here), so the model is exact rather than sampled.

Memory per class: sum_l H_l W_l (C_l + C_l^2 + 1) floats (default levels: 784 * 1640 +
196 * 12656, about 3.8 M floats = 15 MB in float32), the price of a per-position covariance.
"""

from __future__ import annotations

from typing import Any

import torch

from ccnf.baselines.base import PerClassModel, require_images
from ccnf.flows.gaussian import log_normalizer
from ccnf.schedule import TrainSpec


class GaussianModel(PerClassModel):
    """Per-position Gaussian (mean + precision) per level.

    Buffers per level l: ``mean_l`` (H_l W_l, C_l), ``precision_l`` (H_l W_l, C_l, C_l) and
    ``logdet_l`` (H_l W_l,) = log det Sigma_p, float32, estimated in float64.
    """

    kind = "gaussian"

    def __init__(self, channels: list[int], grids: list[list[int]], *, eps: float) -> None:
        super().__init__(channels, grids)
        if eps <= 0:
            raise ValueError(f"gaussian eps must be > 0, got {eps}")
        self.eps = float(eps)
        for lvl, (c, (h, w)) in enumerate(zip(self.channels, self.grids, strict=True)):
            self.register_buffer(f"mean_{lvl}", torch.zeros(h * w, c))
            self.register_buffer(f"precision_{lvl}", torch.eye(c).expand(h * w, c, c).clone())
            self.register_buffer(f"logdet_{lvl}", torch.zeros(h * w))

    @classmethod
    def fit_steps(cls, n_images: int, train: TrainSpec) -> int:
        """None: the mean and precision are estimated in closed form."""
        return 0

    def spec(self) -> dict[str, Any]:
        return {"channels": self.channels, "grids": self.grids, "eps": self.eps}

    def fit(
        self, feats: list[torch.Tensor], train: TrainSpec, gen: torch.Generator
    ) -> list[dict[str, float]]:
        """Estimate mean and precision per position (train and gen are unused: closed form)."""
        feats = self.check_features(feats, "gaussian fit")
        n = feats[0].shape[0]
        require_images(n, 2, self.kind)
        for lvl, f in enumerate(feats):
            x = f.double().flatten(2).permute(2, 0, 1)  # (P, N, C)
            mean = x.mean(dim=1)
            d = x - mean[:, None]
            cov = d.transpose(1, 2) @ d / (n - 1)  # (P, C, C)
            cov = cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            # Cholesky inverse: the ridge makes Sigma_p SPD even when N < C (rank-deficient).
            chol = torch.linalg.cholesky(cov)
            prec = torch.cholesky_inverse(chol)
            getattr(self, f"mean_{lvl}").copy_(mean.float())
            getattr(self, f"precision_{lvl}").copy_(prec.float())
            logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            getattr(self, f"logdet_{lvl}").copy_(logdet.float())
        return []

    @torch.no_grad()
    def patch_scores(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """nf and latent (module docstring) per patch: per level (B, 1, H_l, W_l)."""
        feats = self.check_features(feats, "gaussian scoring")
        out: dict[str, list[torch.Tensor]] = {"nf": [], "latent": []}
        for lvl, f in enumerate(feats):
            b, c, h, w = f.shape
            d = f.flatten(2).permute(2, 0, 1) - getattr(self, f"mean_{lvl}")[:, None]  # (P, B, C)
            m2 = ((d @ getattr(self, f"precision_{lvl}")) * d).sum(dim=-1)  # (P, B)
            # float32 round-off can push a tiny quadratic form below 0; m^2 is >= 0
            latent = 0.5 * m2.clamp_min(0) / c
            # + 0.5 log(2 pi): the normalizer per dimension
            nf = latent + (0.5 * getattr(self, f"logdet_{lvl}")[:, None] / c + log_normalizer(1))
            out["latent"].append(latent.t().reshape(b, 1, h, w))
            out["nf"].append(nf.t().reshape(b, 1, h, w))
        return out
