"""FastFlow-style 2-D flow over a level's whole feature map (Yu et al. 2021), per class.

One flow per level maps the map X (C, H, W) to Z (C, H, W):
    actnorm:  X' = (X - b) * exp(-log_sigma)          per channel; b, log_sigma initialised
                                                      from the class's training data (Glow)
    K steps:  split channels X' = [A, B] (C_a = C // 2), (s_raw, t) = g_k(A) with g_k a small
              conv net (conv k x k -> ReLU -> conv k x k, hidden = ratio * C, zero padding),
              s = alpha * tanh(s_raw / alpha) * w     soft clamp, warm-up w as in CCNF
              B' = B * exp(s) + t;  then a fixed channel permutation
Steps alternate kernel ``k`` and 1 x 1, as FastFlow does for its ResNet variants.

B' at pixel p depends on A only through the subnet, so each step's Jacobian is block
triangular and its log-det is a sum over pixels of sum_c s_c(p): the log-det splits exactly
into per-position terms, logdet_p = sum_k sum_c s_{k,c}(p) - sum_c log_sigma_c, and
    log p(X) = sum_p [ -0.5 ||z_p||^2 - 0.5 C log(2 pi) + logdet_p ].
Patch scores at p: nf = -(-0.5 ||z_p||^2 - 0.5 C log(2 pi) + logdet_p) / C, latent =
0.5 ||z_p||^2 / C; the training loss is nf's mean over positions, images and levels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ccnf.baselines.base import PerClassModel, require_images
from ccnf.flows.affine import coupling_forward, coupling_inverse
from ccnf.flows.gaussian import half_sq_norm, log_normal_from_half_sq
from ccnf.flows.log_scale import clamped_log_scale
from ccnf.flows.permutation import half_swap_permutations
from ccnf.schedule import TrainSpec


class ConvAffineCoupling(nn.Module):
    """Channel-split affine coupling with a convolutional subnet.

    forward(x (B, C, H, W), warm) -> (y (B, C, H, W), logdet (B, H, W)).
    """

    def __init__(self, channels: int, hidden: int, kernel: int, clamp_alpha: float) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {channels}")
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd (same-size output), got {kernel}")
        self.c_a = channels // 2
        self.c_b = channels - self.c_a
        self.clamp_alpha = clamp_alpha
        pad = kernel // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.c_a, hidden, kernel, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * self.c_b, kernel, padding=pad),
        )

    def _scale_shift(self, a: torch.Tensor, warm: float) -> tuple[torch.Tensor, torch.Tensor]:
        s_raw, t = self.subnet(a).chunk(2, dim=1)
        return clamped_log_scale(s_raw, self.clamp_alpha, warm), t

    def forward(self, x: torch.Tensor, warm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        y, s = coupling_forward(x, self.c_a, lambda a: self._scale_shift(a, warm))
        return y, s.sum(dim=1)

    def inverse(self, y: torch.Tensor, warm: float = 1.0) -> torch.Tensor:
        return coupling_inverse(y, self.c_a, lambda a: self._scale_shift(a, warm))


class FastFlow2d(nn.Module):
    """Actnorm + K convolutional couplings with channel permutations, for one level.

    forward(x (B, C, H, W), warm) -> (z (B, C, H, W), logdet (B, H, W) per position).
    """

    def __init__(
        self, channels: int, *, n_steps: int, hidden: int, kernel: int, clamp_alpha: float
    ) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(channels))
        self.log_sigma = nn.Parameter(torch.zeros(channels))
        self.couplings = nn.ModuleList(
            ConvAffineCoupling(channels, hidden, kernel if k % 2 == 0 else 1, clamp_alpha)
            for k in range(n_steps)
        )
        # as in ConditionalFlow: no channel passes through untransformed (ccnf.flows.permutation)
        perms, inv_perms = half_swap_permutations(channels, n_steps)
        self.register_buffer("perms", perms)
        self.register_buffer("inv_perms", inv_perms)

    @torch.no_grad()
    def init_actnorm(self, x: torch.Tensor) -> None:
        """Data-dependent init (Glow): per-channel mean/std of x (N, C, H, W) -> unit scale."""
        self.shift.copy_(x.mean(dim=(0, 2, 3)))
        self.log_sigma.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-6).log())

    def forward(self, x: torch.Tensor, warm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        x = (x - self.shift[:, None, None]) * torch.exp(-self.log_sigma)[:, None, None]
        logdet = (-self.log_sigma.sum()).expand(b, h, w)
        for coupling, perm in zip(self.couplings, self.perms, strict=True):
            x, ld = coupling(x, warm)
            x = x[:, perm]
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, warm: float = 1.0) -> torch.Tensor:
        for coupling, inv in zip(reversed(self.couplings), reversed(self.inv_perms), strict=True):
            z = coupling.inverse(z[:, inv], warm)
        return z * torch.exp(self.log_sigma)[:, None, None] + self.shift[:, None, None]


class FastFlowModel(PerClassModel):
    """One class's FastFlow: a :class:`FastFlow2d` per level."""

    kind = "fastflow"

    def __init__(
        self,
        channels: list[int],
        grids: list[list[int]],
        *,
        n_steps: int | list[int],
        hidden_ratio: float,
        kernel: int,
        clamp_alpha: float,
        warmup_steps: int,
    ) -> None:
        """n_steps: flow steps per level (one number for all levels, or a list)."""
        super().__init__(channels, grids)
        steps = list(n_steps) if isinstance(n_steps, list) else [n_steps] * len(self.channels)
        self._spec = {
            "n_steps": n_steps,
            "hidden_ratio": hidden_ratio,
            "kernel": kernel,
            "clamp_alpha": clamp_alpha,
            "warmup_steps": warmup_steps,
        }
        self.warmup_steps = warmup_steps
        self.flows = nn.ModuleList(
            FastFlow2d(
                c,
                n_steps=k,
                hidden=max(1, round(hidden_ratio * c)),
                kernel=kernel,
                clamp_alpha=clamp_alpha,
            )
            for c, k in zip(self.channels, steps, strict=True)
        )
        self.register_buffer("global_step", torch.tensor(0, dtype=torch.long))

    def spec(self) -> dict[str, Any]:
        return {"channels": self.channels, "grids": self.grids, **self._spec}

    def level_maps(self, level: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> (-log p per position / C, 0.5 ||z||^2 per position / C), each
        (B, 1, H, W)."""
        z, logdet = self.flows[level](x, self.warm())
        c = x.shape[1]
        half_sq = half_sq_norm(z, dim=1)
        log_p = log_normal_from_half_sq(half_sq, c) + logdet
        return (-log_p / c)[:, None], (half_sq / c)[:, None]

    def fit(
        self, feats: list[torch.Tensor], train: TrainSpec, gen: torch.Generator
    ) -> list[dict[str, float]]:
        feats = self.check_features(feats, "fastflow fit")
        n = feats[0].shape[0]
        require_images(n, 2, self.kind)
        for flow, f in zip(self.flows, feats, strict=True):
            flow.init_actnorm(f)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            # whole maps (no position sampling): the conv subnets need the neighbourhood
            return torch.stack(
                [self.level_maps(lvl, f[images])[0].mean() for lvl, f in enumerate(feats)]
            ).mean()

        return self.train_epochs(n, train, gen, loss_of)

    @torch.no_grad()
    def patch_scores(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """nf = -log p per position / C_l, latent = 0.5 ||z||^2 / C_l: per level
        (B, 1, H_l, W_l)."""
        feats = self.check_features(feats, "fastflow scoring")
        self.eval()
        pairs = [self.level_maps(lvl, f) for lvl, f in enumerate(feats)]
        return {"nf": [p[0] for p in pairs], "latent": [p[1] for p in pairs]}
