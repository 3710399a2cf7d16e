"""CCNF: one conditional flow per feature level, shared by all classes.

Per level l (patch features x in R^{D_l}):
    c = [e_y, PE(position)]                  class embedding (grows with classes) + 2-D PE
    z = f_l(x; c)
    log p(x | y) = log N(z; 0, I) + log|det df_l/dx|
                 = -0.5 ||z||^2 - 0.5 D_l log(2 pi) + logdet.
A prototype head mu_{y,l} = P_l e_y (P_l: linear, no bias, init 0.1 * I_{D_l x E}) maps the
class embedding into each level's latent space; the detached centre loss (E11) trains it and
the ``proto`` score reads it.
"""

from __future__ import annotations

import math
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

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LevelOutput:
    """Result of one level's flow on N patch vectors of dimension D.

    z: (N, D); logdet: (N,); scale_sq: (N,) mean s^2 over couplings; log_prob: (N,) nats.
    """

    z: torch.Tensor
    logdet: torch.Tensor
    scale_sq: torch.Tensor
    log_prob: torch.Tensor


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
        self.flows = nn.ModuleList(
            ConditionalFlow(
                d,
                emb + cfg.pos_dim,
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
        self.register_buffer("global_step", torch.tensor(0, dtype=torch.long))

    # -- classes -----------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return self.embedding.shape[0]

    @property
    def n_levels(self) -> int:
        return len(self.channels)

    def add_classes(self, n: int) -> None:
        """Grow the embedding table by n rows, N(0, 1) from the global RNG (seed first)."""
        new = torch.randn(n, self.embedding.shape[1], device=self.embedding.device)
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

    # -- per-level computation ---------------------------------------------------------------
    def positions(self, level: int) -> torch.Tensor:
        """(H_l * W_l, pos_dim) positional encodings of the level's grid."""
        return getattr(self, f"pos_{level}")

    def condition(self, level: int, y: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
        """c = [e_y, PE(pos)]: y (N,) class ids, pos_index (N,) flat grid index -> (N, E+P)."""
        return torch.cat([self.embedding[y], self.positions(level)[pos_index]], dim=-1)

    def prototype(self, level: int, y: torch.Tensor) -> torch.Tensor:
        """mu_{y,l} = P_l e_y: y (M,) -> (M, D_l)."""
        return self.protos[level](self.embedding[y])

    def forward_level(
        self, level: int, x: torch.Tensor, y: torch.Tensor, pos_index: torch.Tensor
    ) -> LevelOutput:
        """x (N, D_l) patch features, y (N,) class ids, pos_index (N,) -> LevelOutput."""
        z, logdet, scale_sq = self.flows[level](x, self.condition(level, y, pos_index), self.warm())
        d = x.shape[1]
        log_prob = -0.5 * z.pow(2).sum(dim=-1) - 0.5 * d * LOG_2PI + logdet
        return LevelOutput(z=z, logdet=logdet, scale_sq=scale_sq, log_prob=log_prob)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "channels": self.channels,
            "grids": self.grids,
            "n_classes": self.n_classes,
            **extra,
        }

    @staticmethod
    def from_checkpoint(ckpt: dict[str, Any], cfg: FlowConfig) -> CCNF:
        model = CCNF(ckpt["channels"], ckpt["grids"], cfg, n_classes=ckpt["n_classes"])
        try:
            model.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as err:
            raise CcnfError(
                f"checkpoint does not match the flow params: {str(err).splitlines()[0]}",
                fix="the flow section changed since this checkpoint was written: dvc repro",
            ) from None
        return model


def read_checkpoint(path: Path) -> dict[str, Any]:
    file = Path(path) / "model.pt"
    if not file.is_file():
        raise CcnfError(f"checkpoint not found: {file}", fix="run the stage that writes it")
    return torch.load(file, map_location="cpu", weights_only=False)
