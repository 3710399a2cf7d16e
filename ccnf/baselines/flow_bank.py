"""Per-class CFlow-style flow: one position-conditioned flow per level, owned by one class.

Per level l (patch vector x in R^{D_l} at grid position p):
    c = PE(p)                                  2-D sinusoidal encoding (no class embedding);
                                               with ``flow.mean_condition_dim`` k also
                                               A_l (m(p) - mean_p m(p)) / s, the class's mean
                                               content at p (as CCNF's condition)
    z = f_l(x; c)                              the same ConditionalFlow CCNF uses
    log p(x) = -0.5 ||z||^2 - 0.5 D_l log(2 pi) + log|det df_l/dx|
    patch scores: nf = -log p(x) / D_l, latent = 0.5 ||z||^2 / D_l
Training: L_g = mean over levels of mean(-log p / D_l) on ``train.patches_per_image`` random
positions of ``train.images_per_step`` images per step for the budget of
:class:`ccnf.schedule.StepBudget`, AdamW, gradient-norm clipping, the soft clamp and the
additive-to-affine warm-up of the CCNF couplings (``flow.*``). Capacity per level as CCNF's
(``flow.n_couplings``, ``flow.hidden_ratio`` / ``hidden_dim``).

With ``flow.feature_norm`` or ``flow.class_norm`` each channel is first standardised with this
class's own training mean/std (for a one-class model the two are the same), stored with the
model; log p then includes the standardisation's log-det -sum_c log std_c, so likelihoods stay
comparable across classes (class selection). With ``flow.class_norm_mean: position`` (and
class_norm) the mean is the class's mean feature map m(p), one mean vector per grid position,
and std that of the deviations from it, as CCNF does: the two then model the same normalized
features, so the joint-vs-bank comparison measures sharing, not a different normalization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ccnf.baselines.base import PerClassModel, require_images
from ccnf.flows.flow import ConditionalFlow
from ccnf.flows.gaussian import half_sq_norm, log_normal_from_half_sq
from ccnf.flows.mean_condition import mean_condition_maps, mean_content
from ccnf.flows.positional import positional_encoding_2d
from ccnf.patches import gather_patches, sample_positions
from ccnf.schedule import TrainSpec


class FlowBankModel(PerClassModel):
    """One class's multi-level position-conditioned flow (CFlow-style)."""

    kind = "flow_bank"

    def __init__(
        self,
        channels: list[int],
        grids: list[list[int]],
        *,
        n_couplings: list[int],
        hidden_dims: list[int],
        clamp_alpha: float,
        spectral_norm: bool,
        pos_dim: int,
        warmup_steps: int,
        feature_norm: bool,
        position_mean: bool = False,
        mean_condition_dim: int = 0,
    ) -> None:
        super().__init__(channels, grids)
        self._spec = {
            "n_couplings": list(n_couplings),
            "hidden_dims": list(hidden_dims),
            "clamp_alpha": clamp_alpha,
            "spectral_norm": spectral_norm,
            "pos_dim": pos_dim,
            "warmup_steps": warmup_steps,
            "feature_norm": feature_norm,
            "position_mean": position_mean,
            **({"mean_condition_dim": mean_condition_dim} if mean_condition_dim else {}),
        }
        self.warmup_steps = warmup_steps
        self.feature_norm = feature_norm
        self.position_mean = feature_norm and position_mean
        if mean_condition_dim and not self.position_mean:
            raise ValueError("mean_condition_dim needs the position mean (feature_norm and "
                             "position_mean)")
        self.mean_condition_dim = mean_condition_dim
        self.flows = nn.ModuleList(
            ConditionalFlow(
                c,
                pos_dim + mean_condition_dim,
                n_couplings=k,
                hidden_dim=hid,
                clamp_alpha=clamp_alpha,
                spectral_norm=spectral_norm,
            )
            for c, k, hid in zip(self.channels, n_couplings, hidden_dims, strict=True)
        )
        for lvl, (c, (h, w)) in enumerate(zip(self.channels, self.grids, strict=True)):
            # Deterministic from the grid: recomputed on load, so not stored in checkpoints.
            self.register_buffer(
                f"pos_{lvl}", positional_encoding_2d(pos_dim, h, w), persistent=False
            )
            # (D_l,), or with position_mean one mean per grid position (H_l * W_l, D_l)
            self.register_buffer(f"feat_mean_{lvl}", torch.zeros(
                *((h * w, c) if self.position_mean else (c,))))
            self.register_buffer(f"feat_std_{lvl}", torch.ones(c))
        if mean_condition_dim:
            self.mean_projs = mean_condition_maps(self.channels, mean_condition_dim)
        self.register_buffer("global_step", torch.tensor(0, dtype=torch.long))

    def spec(self) -> dict[str, Any]:
        return {"channels": self.channels, "grids": self.grids, **self._spec}

    def level_log_prob(
        self, level: int, x: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D_l) raw patch features at flat grid positions pos (N,) -> (log p(x) (N,),
        0.5 ||z||^2 (N,))."""
        mean, std = getattr(self, f"feat_mean_{level}"), getattr(self, f"feat_std_{level}")
        x = (x - (mean[pos] if self.position_mean else mean)) / std
        cond = getattr(self, f"pos_{level}")[pos]
        if self.mean_condition_dim:
            content = mean_content(mean[pos], mean.mean(dim=0), std)
            cond = torch.cat([cond, self.mean_projs[level](content)], dim=-1)
        z, logdet, _ = self.flows[level](x, cond, self.warm())
        half_sq = half_sq_norm(z)
        return log_normal_from_half_sq(half_sq, x.shape[1]) + logdet - std.log().sum(), half_sq

    def fit(
        self, feats: list[torch.Tensor], train: TrainSpec, gen: torch.Generator
    ) -> list[dict[str, float]]:
        feats = self.check_features(feats, "flow_bank fit")
        n = feats[0].shape[0]
        require_images(n, 1, self.kind)
        per_level = [f.flatten(2).transpose(1, 2).contiguous() for f in feats]  # (N, P_l, D_l)
        if self.feature_norm:
            for lvl, x in enumerate(per_level):
                flat = x.reshape(-1, x.shape[-1])
                mean = x.mean(0) if self.position_mean else flat.mean(0)
                dev = (x - mean).reshape(-1, x.shape[-1]) if self.position_mean else flat
                getattr(self, f"feat_mean_{lvl}").copy_(mean)
                getattr(self, f"feat_std_{lvl}").copy_(dev.std(0).clamp_min(1e-6))

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            losses = []
            for lvl, x_all in enumerate(per_level):
                x, pos = _sample(x_all, images, train.patches_per_image, gen)
                losses.append((-self.level_log_prob(lvl, x, pos)[0] / x.shape[1]).mean())
            return torch.stack(losses).mean()

        return self.train_epochs(n, train, gen, loss_of)

    @torch.no_grad()
    def patch_scores(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """nf = -log p(x_p) / D_l and latent = 0.5 ||z_p||^2 / D_l per patch: per level
        (B, 1, H_l, W_l)."""
        feats = self.check_features(feats, "flow_bank scoring")
        self.eval()  # eval: no spectral-norm power iteration, the stored weights stay untouched
        out: dict[str, list[torch.Tensor]] = {"nf": [], "latent": []}
        for lvl, f in enumerate(feats):
            b, d, h, w = f.shape
            x = f.flatten(2).transpose(1, 2).reshape(b * h * w, d)
            pos = torch.arange(h * w, device=f.device).repeat(b)
            log_p, half_sq = self.level_log_prob(lvl, x, pos)
            out["nf"].append((-log_p / d).view(b, 1, h, w))
            out["latent"].append((half_sq / d).view(b, 1, h, w))
        return out


def _sample(
    x_all: torch.Tensor, images: torch.Tensor, k: int | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """k random positions per image (all when k is None or >= P): ((B*k, D), (B*k,) positions)."""
    pos = sample_positions(images.numel(), x_all.shape[1], k, gen).to(x_all.device)
    return gather_patches(x_all, images.to(x_all.device), pos), pos.reshape(-1)
