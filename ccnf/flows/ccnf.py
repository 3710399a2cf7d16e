"""CCNF: one conditional flow per feature level, shared by all classes.

Per level l (patch features x in R^{D_l}):
    x' = (x - m_l) / s_l                     fixed feature normalization (E1; identity if off)
    c = [e_y, PE(position), phi(sigma)]      class embedding (grows with classes), 2-D PE,
                                             noise-level embedding (P6; only if noise_dim > 0)
    z = f_l(x'; c)
    log p(x | y) = log N(z; mu, I) + log|det df_l/dx'| - sum_d log s_{l,d}
                 = -0.5 ||z - mu||^2 - 0.5 D_l log(2 pi) + logdet,
with mu = 0 (``flow.prior: standard``) or mu = mu_{y,l} (``class_mixture``, E7/E10).
A prototype head mu_{y,l} = P_l e_y (P_l: linear, no bias, init 0.1 * I_{D_l x E}) maps the
class embedding into each level's latent space; the centre loss (E11/E10) trains it and the
``proto`` score reads it. ``flow.class_conditioning: false`` drops e_y from c (position-only
flow); the embedding then feeds only the prototype head.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccnf.config import FlowConfig
from ccnf.errors import CcnfError
from ccnf.flows.flow import ConditionalFlow
from ccnf.flows.positional import positional_encoding_2d
from ccnf.flows.spectral import SNLinear
from ccnf.store import load_artifact, recovery_fix

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LevelOutput:
    """Result of one level's flow on N patch vectors of dimension D.

    z: (N, D); logdet: (N,); scale_sq: (N,) mean s^2 over couplings; log_prob: (N,) nats;
    mu: (N, D) prior mean per vector, or None for the standard prior (mu = 0).
    """

    z: torch.Tensor
    logdet: torch.Tensor
    scale_sq: torch.Tensor
    log_prob: torch.Tensor
    mu: torch.Tensor | None = None

    @property
    def z_centered(self) -> torch.Tensor:
        """z - mu: the latent the prior's regularizers should see as N(0, I)."""
        return self.z if self.mu is None else self.z - self.mu


def noise_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """phi(sigma) = [sin(2^k pi sigma), cos(2^k pi sigma)]_{k < dim/2}: (N,) -> (N, dim).

    sigma = 0 (clean data) maps to [0, ..., 0, 1, ..., 1]; distinct noise levels in (0, 1]
    get distinct codes.
    """
    freq = math.pi * 2.0 ** torch.arange(dim // 2, dtype=sigma.dtype, device=sigma.device)
    arg = sigma[:, None] * freq
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class CCNF(nn.Module):
    """Continual conditional normalizing flow over L feature levels.

    Args:
        channels: D_l per level.  grids: (H_l, W_l) per level (for the positional encoding).
        cfg: the ``flow`` section of params.yaml.
    """

    def __init__(
        self, channels: list[int], grids: list[list[int]], cfg: FlowConfig, n_classes: int = 0
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.grids = [list(g) for g in grids]
        self.cfg = cfg
        emb = cfg.embedding_dim
        self.embedding = nn.Parameter(torch.randn(n_classes, emb))
        cond_dim = (emb if cfg.class_conditioning else 0) + cfg.pos_dim + cfg.noise_dim
        self.flows = nn.ModuleList(
            ConditionalFlow(
                d,
                cond_dim,
                n_couplings=cfg.n_couplings,
                hidden_dim=cfg.hidden_dim,
                clamp_alpha=cfg.clamp_alpha,
                spectral_norm=cfg.spectral_norm,
            )
            for d in self.channels
        )
        self.protos = nn.ModuleList()
        for d in self.channels:
            proj = nn.Linear(emb, d, bias=False)
            with torch.no_grad():
                proj.weight.copy_(0.1 * torch.eye(d, emb))
            self.protos.append(proj)
        for lvl, (h, w) in enumerate(self.grids):
            self.register_buffer(f"pos_{lvl}", positional_encoding_2d(cfg.pos_dim, h, w))
            # E1 feature normalization; identity until set_feature_stats (and when it is off)
            self.register_buffer(f"feat_mean_{lvl}", torch.zeros(self.channels[lvl]))
            self.register_buffer(f"feat_std_{lvl}", torch.ones(self.channels[lvl]))
        self.register_buffer("global_step", torch.tensor(0, dtype=torch.long))
        # loss-specific heads (E4 L_proto, E5 L_mi_feat), created by the loss that needs them
        self.heads = nn.ModuleDict()

    # -- classes -----------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return self.embedding.shape[0]

    @property
    def n_levels(self) -> int:
        return len(self.channels)

    def add_classes(self, n: int) -> None:
        """Grow the embedding table by n rows, N(0, 1) from the global RNG (seed first)."""
        new = torch.randn(n, self.embedding.shape[1]).to(self.embedding.device)
        self.embedding = nn.Parameter(torch.cat([self.embedding.detach(), new], dim=0))

    # -- stabilizer switches -----------------------------------------------------------------
    def warm(self) -> float:
        """Additive-to-affine factor w = min(1, step / warmup_steps)."""
        if self.cfg.warmup_steps == 0:
            return 1.0
        return min(1.0, float(self.global_step) / self.cfg.warmup_steps)

    def set_spectral_norm(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, SNLinear):
                m.enabled.fill_(enabled)

    # -- E1 feature normalization ------------------------------------------------------------
    def feature_stats(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D_l,), std (D_l,)) applied to the level's features before the flow."""
        return getattr(self, f"feat_mean_{level}"), getattr(self, f"feat_std_{level}")

    def set_feature_stats(self, level: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the level's normalization (done once, on task 0's training features)."""
        m, s = self.feature_stats(level)
        m.copy_(mean)
        s.copy_(std)

    # -- loss heads --------------------------------------------------------------------------
    def head(self, name: str, build: Callable[[], nn.Module]) -> nn.Module:
        """The head ``name``, created by ``build()`` the first time a loss asks for it.

        Heads are built from a generator seeded by the name, so adding one never shifts the
        global RNG stream (and with it every later draw of the run).
        """
        if name not in self.heads:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(name.encode()))
                self.heads[name] = build().to(self.embedding.device)
        return self.heads[name]

    # -- per-level computation ---------------------------------------------------------------
    def positions(self, level: int) -> torch.Tensor:
        """(H_l * W_l, pos_dim) positional encodings of the level's grid."""
        return getattr(self, f"pos_{level}")

    def condition(
        self,
        level: int,
        y: torch.Tensor,
        pos_index: torch.Tensor,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """c = [e_y, PE(pos), phi(sigma)]: y, pos_index, sigma (N,) -> (N, cond_dim).

        e_y is left out without class conditioning, phi(sigma) without a noise embedding;
        sigma None means clean data (sigma = 0).
        """
        parts = [self.positions(level)[pos_index]]
        if self.cfg.class_conditioning:
            parts.insert(0, self.embedding[y])
        if self.cfg.noise_dim > 0:
            if sigma is None:
                sigma = torch.zeros(y.shape[0], device=y.device)
            parts.append(noise_embedding(sigma.float(), self.cfg.noise_dim))
        return torch.cat(parts, dim=-1)

    def prototype(self, level: int, y: torch.Tensor) -> torch.Tensor:
        """mu_{y,l} = P_l e_y: y (M,) -> (M, D_l)."""
        return self.protos[level](self.embedding[y])

    def forward_level(
        self,
        level: int,
        x: torch.Tensor,
        y: torch.Tensor,
        pos_index: torch.Tensor,
        sigma: torch.Tensor | None = None,
    ) -> LevelOutput:
        """x (N, D_l) patch features, y (N,) class ids, pos_index (N,) -> LevelOutput.

        sigma (N,): noise level of x for the P6 noise-conditioned flow (None: clean).
        """
        mean, std = self.feature_stats(level)
        if self.cfg.feature_norm:
            x = (x - mean) / std
        cond = self.condition(level, y, pos_index, sigma)
        z, logdet, scale_sq = self.flows[level](x, cond, self.warm())
        if self.cfg.feature_norm:
            logdet = logdet - std.log().sum()
        d = x.shape[1]
        mu = self.prototype(level, y) if self.cfg.prior == "class_mixture" else None
        centred = z if mu is None else z - mu
        log_prob = -0.5 * centred.pow(2).sum(dim=-1) - 0.5 * d * LOG_2PI + logdet
        return LevelOutput(z=z, logdet=logdet, scale_sq=scale_sq, log_prob=log_prob, mu=mu)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "channels": self.channels,
            "grids": self.grids,
            "n_classes": self.n_classes,
            "heads": {name: _head_shapes(h) for name, h in self.heads.items()},
            **extra,
        }

    @staticmethod
    def from_checkpoint(ckpt: dict[str, Any], cfg: FlowConfig) -> CCNF:
        if "state_dict" not in ckpt:
            raise CcnfError(
                f"checkpoint holds a '{ckpt.get('kind', '?')}' model, not CCNF (model.kind)",
                fix="model.kind changed since this checkpoint was written: dvc repro",
            )
        # building the module draws random inits that load_state_dict then overwrites: keep
        # them off the global stream so what the caller draws next does not depend on them
        with torch.random.fork_rng(devices=[]):
            model = CCNF(ckpt["channels"], ckpt["grids"], cfg, n_classes=ckpt["n_classes"])
            for name, shapes in ckpt.get("heads", {}).items():
                model.heads[name] = _head_from_shapes(shapes)
        try:
            model.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as err:
            raise CcnfError(
                f"checkpoint does not match the flow params: {str(err).splitlines()[0]}",
                fix="the flow section changed since this checkpoint was written: dvc repro",
            ) from None
        return model


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``path``/model.pt: any model kind's checkpoint dict (pickle-free, see ccnf.store)."""
    file = Path(path) / "model.pt"
    if not file.is_file():
        raise CcnfError(f"checkpoint not found: {file}", fix="run the stage that writes it")
    ckpt = load_artifact(file, kind="checkpoint", fix=recovery_fix(file))
    if not isinstance(ckpt, dict):
        raise CcnfError(f"checkpoint {file} does not hold a dict", where=str(file),
                        fix=recovery_fix(file))
    return ckpt


def _head_shapes(head: nn.Module) -> list[list[int]]:
    """A head is a ModuleList of bias-free Linear layers: its [out, in] shapes rebuild it."""
    return [list(m.weight.shape) for m in head.modules() if isinstance(m, nn.Linear)]


def _head_from_shapes(shapes: list[list[int]]) -> nn.Module:
    return nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
