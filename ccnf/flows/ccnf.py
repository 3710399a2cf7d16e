"""CCNF: one conditional flow per feature level, shared by all classes.

Per level l (patch features x in R^{D_l}):
    x' = (x - m) / s                         fixed feature normalization: m, s of task 0 (E1,
                                             ``flow.feature_norm``) or of class y itself
                                             (``flow.class_norm``); identity if both are off;
                                             m = m_y(position), class y's mean feature map,
                                             with ``flow.class_norm_mean: position``; kept
                                             whole, as its channel mean plus r leading
                                             singular components (``flow.class_mean_rank``),
                                             or in b bits a value (``flow.class_mean_bits``,
                                             on an even grid or at Lloyd-Max levels:
                                             ``flow.class_mean_quantizer``,
                                             :mod:`ccnf.flows.mean_codes`)
    c = [e_y, PE(position), phi(sigma), A_l u_y(position)]
                                             class embedding (grows with classes), 2-D PE,
                                             noise-level embedding (P6; only if noise_dim > 0),
                                             the class's mean content at the position
                                             u_y(p) = (m_y(p) - mean_p m_y(p)) / s_y through a
                                             learned A_l (D_l -> k; ``flow.mean_condition_dim``
                                             k > 0, needs the positional mean)
    z = f_l(x'; c)
    log p(x | y) = log N(z; mu, I) + log|det df_l/dx'| - sum_d log s_d
                 = -0.5 ||z - mu||^2 - 0.5 D_l log(2 pi) + logdet     (ccnf.flows.gaussian),
with mu = 0 (``flow.prior: standard``) or mu = mu_{y,l} (``class_mixture``, E7/E10).
With ``flow.conditioning: film`` e_y leaves c and modulates the subnets' hidden units instead.
With ``flow.class_actnorm`` each class also has its own learned elementwise affine (log-scale,
shift) in front of every coupling: a class-conditional ActNorm, per-class capacity at the cost of
2 D_l values per coupling and class.
A prototype head mu_{y,l} = P_l e_y (P_l: linear, no bias, init 0.1 * I_{D_l x E}) maps the
class embedding into each level's latent space; the centre loss (E11/E10) trains it and the
``proto`` score reads it. With ``flow.prototypes: fixed`` a class's mu_{y,l} is copied into a
buffer when its task ends and read from there afterwards, so later tasks cannot move it.
``flow.class_conditioning: false`` drops e_y from c (position-only flow); the embedding then
feeds only the prototype head.
With ``flow.class_adapter_rank`` r > 0 every class gets its own rank-r adapter the same way
(made when its task starts, ``class_adapter`` names it), per-class capacity beside the shared
weights.
With ``train.strategy: adapters`` each task after the first adds a low-rank adapter to every
coupling's subnet (and FiLM map, ``train.adapter_film_rank``; :mod:`ccnf.flows.adapters`);
``class_adapter`` (C,) names the adapter each class is scored with (-1 for the first task's
classes: the shared flow alone). A flow that never
got an adapter has neither the buffer nor adapter tensors, so its checkpoint is the plain one.
:meth:`inverse_level` maps latents back to features (``train.strategy: generative_replay``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ccnf.errors import CcnfError
from ccnf.flows.adapters import AdapterRoute
from ccnf.flows.flow import ConditionalFlow
from ccnf.flows.gaussian import log_normal
from ccnf.flows.log_scale import warmup_factor
from ccnf.flows.mean_codes import (
    LEVELS_DTYPE,
    bytes_per_position,
    decode_with_levels,
    dequantize_rows,
    lloyd_levels,
    quantize_map,
)
from ccnf.flows.mean_condition import mean_condition_maps, mean_content
from ccnf.flows.positional import positional_encoding_2d
from ccnf.flows.spectral import SNLinear

# flow.class_mean_rank: the dtype a low-rank mean map's factors are kept in
MEAN_FACTOR_DTYPE = torch.float16
# train.adapter_storage -> the dtype adapters are checkpointed in
ADAPTER_STORAGE: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


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


@dataclass(frozen=True)
class CCNFSpec:
    """Plain hyper-parameters of a :class:`CCNF` (built from params.yaml's ``flow`` section by
    :func:`ccnf.models.ccnf.ccnf_spec`; the module never sees the schema).

    n_couplings, hidden_dims: per level; conditioning: film | concat; prior: standard |
    class_mixture; prototypes: fixed | shared; the rest as the ``flow.*`` keys of the same name.
    """

    n_couplings: tuple[int, ...]
    hidden_dims: tuple[int, ...]
    embedding_dim: int = 32
    pos_dim: int = 32
    noise_dim: int = 0
    conditioning: str = "film"
    class_conditioning: bool = True
    class_norm: bool = True
    class_norm_mean: str = "channel"
    class_mean_rank: int | None = None
    class_mean_bits: int | None = None
    class_mean_quantizer: str = "uniform"
    class_actnorm: bool = False
    mean_condition_dim: int = 0
    feature_norm: bool = False
    prior: str = "standard"
    prototypes: str = "fixed"
    clamp_alpha: float = 1.9
    spectral_norm: bool = False
    warmup_steps: int = 50


class CCNF(nn.Module):
    """Continual conditional normalizing flow over L feature levels.

    Args:
        channels: D_l per level.  grids: (H_l, W_l) per level (for the positional encoding).
        cfg: the flow's hyper-parameters (:class:`CCNFSpec`, one entry per level).
    """

    def __init__(
        self, channels: list[int], grids: list[list[int]], cfg: CCNFSpec, n_classes: int = 0,
        *, n_adapters: int = 0, adapter_rank: int = 0, adapter_film_rank: int = 0,
        adapter_storage: str = "float32", adapter_stacked: bool = False,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.grids = [list(g) for g in grids]
        self.cfg = cfg
        emb = cfg.embedding_dim
        self.embedding = nn.Parameter(torch.randn(n_classes, emb))
        film = cfg.class_conditioning and cfg.conditioning == "film"
        concat = cfg.class_conditioning and not film
        cond_dim = (emb if concat else 0) + cfg.pos_dim + cfg.noise_dim + cfg.mean_condition_dim
        if not len(cfg.n_couplings) == len(cfg.hidden_dims) == len(self.channels):
            raise ValueError(f"{len(self.channels)} levels but {len(cfg.n_couplings)} coupling "
                             f"counts and {len(cfg.hidden_dims)} subnet widths")
        self.flows = nn.ModuleList(
            ConditionalFlow(
                d,
                cond_dim,
                n_couplings=cfg.n_couplings[lvl],
                hidden_dim=cfg.hidden_dims[lvl],
                clamp_alpha=cfg.clamp_alpha,
                spectral_norm=cfg.spectral_norm,
                film_dim=emb if film else 0,
            )
            for lvl, d in enumerate(self.channels)
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
            # flow.class_norm: per-class mean/std rows (C, D_l), set when the class is learned;
            # with class_norm_mean: position the mean is a map (C, H_l * W_l, D_l), or with
            # class_mean_rank r the channel mean (C, D_l) plus float16 factors
            # basis (C, H_l * W_l, r) @ loading (C, r, D_l), or with class_mean_bits b the
            # channel mean plus the rest's offset and step (C, D_l) (class_mean_quantizer:
            # lloyd: its levels (C, D_l, 2^b) float16) and packed codes
            # (C, H_l * W_l, ceil(D_l b / 8)) uint8
            self.register_buffer(f"class_mean_{lvl}", torch.zeros(
                n_classes, *self._mean_shape(lvl)))
            if self.low_rank_mean:
                r = cfg.class_mean_rank
                self.register_buffer(f"class_mean_basis_{lvl}", torch.zeros(
                    n_classes, h * w, r, dtype=MEAN_FACTOR_DTYPE))
                self.register_buffer(f"class_mean_loading_{lvl}", torch.zeros(
                    n_classes, r, self.channels[lvl], dtype=MEAN_FACTOR_DTYPE))
            if self.quantized_mean:
                d = self.channels[lvl]
                if self.lloyd_mean:
                    self.register_buffer(f"class_mean_levels_{lvl}", torch.zeros(
                        n_classes, d, 2 ** self.mean_bits, dtype=LEVELS_DTYPE))
                else:
                    self.register_buffer(f"class_mean_low_{lvl}", torch.zeros(n_classes, d))
                    self.register_buffer(f"class_mean_step_{lvl}", torch.zeros(n_classes, d))
                self.register_buffer(f"class_mean_codes_{lvl}", torch.zeros(
                    n_classes, h * w, bytes_per_position(d, self.mean_bits),
                    dtype=torch.uint8))
            self.register_buffer(f"class_std_{lvl}", torch.ones(n_classes, self.channels[lvl]))
            # flow.prototypes: fixed: mu_{y,l} copied here when class y's task ends
            self.register_buffer(f"proto_fixed_{lvl}", torch.zeros(n_classes, self.channels[lvl]))
            # flow.class_actnorm: per class and coupling, (log-scale, shift) per dimension;
            # zero = identity, and a class's rows get gradients only from its own data
            if cfg.class_actnorm:
                k = cfg.n_couplings[lvl]
                setattr(self, f"actnorm_{lvl}",
                        nn.Parameter(torch.zeros(n_classes, k, 2, self.channels[lvl])))
        if cfg.mean_condition_dim:
            if not self.positional_mean:
                raise ValueError("mean_condition_dim needs class_norm with class_norm_mean: "
                                 "position (the content it reads is the class's mean map)")
            self.mean_projs = mean_condition_maps(self.channels, cfg.mean_condition_dim)
        self.register_buffer("proto_frozen", torch.zeros(n_classes, dtype=torch.bool))
        self.register_buffer("global_step", torch.tensor(0, dtype=torch.long))
        # loss-specific heads (E4 L_proto, E5 L_mi_feat), created by the loss that needs them
        self.heads = nn.ModuleDict()
        self.adapter_storage = adapter_storage
        for _ in range(n_adapters):
            self.add_adapter(adapter_rank, [], adapter_film_rank, adapter_storage,
                             stacked=adapter_stacked)

    # -- classes -----------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return self.embedding.shape[0]

    @property
    def n_levels(self) -> int:
        return len(self.channels)

    def add_classes(self, n: int) -> None:
        """Grow the embedding table by n rows, N(0, 1) from the global RNG (seed first), and
        every per-class buffer by n neutral rows (mean 0, std 1, prototype not frozen)."""
        new = torch.randn(n, self.embedding.shape[1]).to(self.embedding.device)
        self.embedding = nn.Parameter(torch.cat([self.embedding.detach(), new], dim=0))
        per_class = [("class_mean", 0.0), ("class_std", 1.0), ("proto_fixed", 0.0)]
        if self.low_rank_mean:
            per_class += [("class_mean_basis", 0.0), ("class_mean_loading", 0.0)]
        if self.quantized_mean:
            per_class += [("class_mean_levels", 0.0)] if self.lloyd_mean else [
                ("class_mean_low", 0.0), ("class_mean_step", 0.0)]
            per_class.append(("class_mean_codes", 0))
        for lvl in range(self.n_levels):
            for name, fill in per_class:
                old = getattr(self, f"{name}_{lvl}")
                setattr(self, f"{name}_{lvl}",
                        torch.cat([old, old.new_full((n, *old.shape[1:]), fill)]))
            if self.cfg.class_actnorm:
                old = getattr(self, f"actnorm_{lvl}").detach()
                setattr(self, f"actnorm_{lvl}", nn.Parameter(
                    torch.cat([old, old.new_zeros((n, *old.shape[1:]))])))
        self.proto_frozen = torch.cat([self.proto_frozen, self.proto_frozen.new_zeros(n)])
        if self.has_adapters:
            self.class_adapter = torch.cat(
                [self.class_adapter, self.class_adapter.new_full((n,), -1)])

    # -- train.strategy: adapters -------------------------------------------------------------
    @property
    def has_adapters(self) -> bool:
        return "class_adapter" in self._buffers

    @property
    def n_adapters(self) -> int:
        lora = self.flows[0].couplings[0].lora_hidden
        return len(lora) if lora is not None else 0

    @property
    def adapter_rank(self) -> int:
        """Rank of the adapters (0: none yet)."""
        lora = self.flows[0].couplings[0].lora_hidden
        return lora.rank if lora is not None else 0

    @property
    def adapter_film_rank(self) -> int:
        """Rank of the adapters' FiLM part (0: none)."""
        lora = self.flows[0].couplings[0].lora_film
        return lora.rank if lora is not None else 0

    @property
    def adapters_stacked(self) -> bool:
        """Whether adapter k is the sum of adapters 0..k (``train.adapter_stack``)."""
        lora = self.flows[0].couplings[0].lora_hidden
        return lora is not None and lora.stacked

    def add_adapter(
        self, rank: int, class_ids: list[int], film_rank: int = 0, storage: str = "float32",
        *, stacked: bool = False,
    ) -> list[nn.Parameter]:
        """A new rank-``rank`` adapter in every coupling of every level (FiLM map: rank
        ``film_rank``, 0: none), used from now on by ``class_ids``; returns its parameters
        (the only flow tensors the task may train). ``storage``: the dtype the checkpoint keeps
        the adapters in (float16 halves their bytes; :meth:`round_adapters` makes the
        float32 weights equal to what is stored). ``stacked``: the new adapter adds to every
        earlier one (:class:`~ccnf.flows.adapters.LowRankAdapters`)."""
        if storage not in ADAPTER_STORAGE:
            raise ValueError(f"adapter storage must be one of {sorted(ADAPTER_STORAGE)}, "
                             f"got {storage!r}")
        if not self.has_adapters:
            self.register_buffer("class_adapter", torch.full(
                (self.n_classes,), -1, dtype=torch.long, device=self.embedding.device))
        elif self.n_adapters and (rank, film_rank, storage, stacked) != (
                self.adapter_rank, self.adapter_film_rank, self.adapter_storage,
                self.adapters_stacked):
            raise ValueError(
                f"adapters of rank {self.adapter_rank} (FiLM {self.adapter_film_rank}, "
                f"{self.adapter_storage}, stacked {self.adapters_stacked}) exist; cannot add "
                f"rank {rank} (FiLM {film_rank}, {storage}, stacked {stacked})")
        self.adapter_storage = storage
        new = [p for flow in self.flows for p in flow.add_adapter(rank, film_rank, stacked)]
        self.class_adapter[torch.as_tensor(class_ids, dtype=torch.long)] = self.n_adapters - 1
        return new

    @torch.no_grad()
    def round_adapters(self) -> None:
        """Round every adapter weight to its storage dtype (and back to float32), so the model
        that is calibrated and scored is exactly the one its checkpoint holds."""
        dtype = ADAPTER_STORAGE[self.adapter_storage]
        for name, p in self.named_parameters():
            if ".lora_" in name:
                p.copy_(p.to(dtype).to(p.dtype))

    def adapter_route(self, y: torch.Tensor) -> AdapterRoute | None:
        """The adapter of each vector's class (y (N,)), resolved once for the whole pass; None
        for a flow without adapters."""
        if not self.has_adapters:
            return None
        table = self.class_adapter if self.adapter_film_rank else None
        return AdapterRoute.of(self.class_adapter[y], table)

    # -- stabilizer switches -----------------------------------------------------------------
    def warm(self) -> float:
        """Additive-to-affine factor w = min(1, step / warmup_steps)."""
        return warmup_factor(self.global_step, self.cfg.warmup_steps)

    def set_spectral_norm(self, enabled: bool, absorb: bool = False) -> None:
        """Switch spectral norm on or off in every subnet layer. Switching it on with
        ``absorb`` keeps each layer's effective weight (see :meth:`SNLinear.switch_on`)."""
        for m in self.modules():
            if isinstance(m, SNLinear):
                if enabled:
                    m.switch_on(absorb)
                else:
                    m.enabled.fill_(False)

    # -- E1 feature normalization ------------------------------------------------------------
    def feature_stats(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D_l,), std (D_l,)) applied to the level's features before the flow."""
        return getattr(self, f"feat_mean_{level}"), getattr(self, f"feat_std_{level}")

    def set_feature_stats(self, level: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the level's normalization (done once, on task 0's training features)."""
        m, s = self.feature_stats(level)
        m.copy_(mean)
        s.copy_(std)

    # -- flow.class_norm ----------------------------------------------------------------------
    @property
    def positional_mean(self) -> bool:
        """Whether class_norm subtracts a mean map per class (``class_norm_mean: position``;
        without class_norm nothing is subtracted and no map is kept)."""
        return self.cfg.class_norm and self.cfg.class_norm_mean == "position"

    @property
    def low_rank_mean(self) -> bool:
        """Whether the mean map is kept as channel mean + rank-r factors
        (``flow.class_mean_rank``)."""
        return self.positional_mean and self.cfg.class_mean_rank is not None

    @property
    def quantized_mean(self) -> bool:
        """Whether the mean map is kept as channel mean + b-bit codes of the rest
        (``flow.class_mean_bits``)."""
        return self.positional_mean and self.cfg.class_mean_bits is not None

    @property
    def lloyd_mean(self) -> bool:
        """Whether the quantized map's levels are Lloyd-Max levels per channel
        (``flow.class_mean_quantizer: lloyd``) instead of an even grid."""
        return self.quantized_mean and self.cfg.class_mean_quantizer == "lloyd"

    @property
    def mean_bits(self) -> int:
        """b of ``flow.class_mean_bits`` (only for a quantized mean map)."""
        if self.cfg.class_mean_bits is None:
            raise ValueError("mean_bits needs flow.class_mean_bits")
        return self.cfg.class_mean_bits

    @property
    def compact_mean(self) -> bool:
        """Whether the mean buffer holds the channel mean only, the map's detail kept apart
        (low-rank factors or codes)."""
        return self.low_rank_mean or self.quantized_mean

    def _mean_shape(self, level: int) -> tuple[int, ...]:
        """Shape of one class's mean buffer row at ``level``: (H_l * W_l, D_l) for a whole
        map, else (D_l,) (the channel mean; a compact map keeps its factors or codes apart)."""
        h, w = self.grids[level]
        d = self.channels[level]
        return (h * w, d) if self.positional_mean and not self.compact_mean else (d,)

    def class_stats(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (C, D_l) or (C, H_l * W_l, D_l), std (C, D_l)) of every class, for
        ``flow.class_norm``."""
        return getattr(self, f"class_mean_{level}"), getattr(self, f"class_std_{level}")

    def set_class_stats(
        self, level: int, class_id: int, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        """Fix class ``class_id``'s normalization at ``level`` (once, when it is learned):
        mean (D_l,) or, with ``class_norm_mean: position``, the map (H_l * W_l, D_l); std
        (D_l,). With ``class_mean_rank`` r the map is kept as its channel mean mu plus the
        r leading singular components of M - mu, with ``class_mean_bits`` b as mu plus M - mu
        in b bits a value (:meth:`class_mean_map` gives either back)."""
        m = self.class_stats(level)[0]
        h, w = self.grids[level]
        want = (h * w, self.channels[level]) if self.positional_mean else tuple(m.shape[1:])
        if tuple(mean.shape) != want:
            raise ValueError(f"class mean of level {level} must be {want}, "
                             f"got {tuple(mean.shape)}")
        if self.low_rank_mean:
            basis, loading = _low_rank(mean, self.cfg.class_mean_rank or 0)
            mean = mean.mean(dim=0)
            getattr(self, f"class_mean_basis_{level}")[class_id].copy_(basis)
            getattr(self, f"class_mean_loading_{level}")[class_id].copy_(loading)
        elif self.quantized_mean:
            channel_mean = mean.mean(dim=0)
            if self.lloyd_mean:
                levels, codes = lloyd_levels(mean - channel_mean, self.mean_bits)
                getattr(self, f"class_mean_levels_{level}")[class_id].copy_(levels)
            else:
                low, step, codes = quantize_map(mean - channel_mean, self.mean_bits)
                getattr(self, f"class_mean_low_{level}")[class_id].copy_(low)
                getattr(self, f"class_mean_step_{level}")[class_id].copy_(step)
            getattr(self, f"class_mean_codes_{level}")[class_id].copy_(codes)
            mean = channel_mean
        m[class_id].copy_(mean)
        self.set_class_std(level, class_id, std)

    def set_class_std(self, level: int, class_id: int, std: torch.Tensor) -> None:
        """Fix class ``class_id``'s std (D_l,) at ``level``, its mean left as set."""
        self.class_stats(level)[1][class_id].copy_(std)

    def class_mean_map(self, level: int, class_id: int) -> torch.Tensor:
        """The mean map subtracted for class ``class_id``: (H_l * W_l, D_l) (positional mean
        only)."""
        if not self.positional_mean:
            raise ValueError("class_mean_map needs flow.class_norm_mean: position")
        pos = torch.arange(self.grids[level][0] * self.grids[level][1],
                           device=self.embedding.device)
        return self._class_mean(level, torch.full_like(pos, class_id), pos)

    def _class_mean(self, level: int, y: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
        """The mean subtracted from each vector: (N, D_l) for y, pos_index (N,)."""
        means = self.class_stats(level)[0]
        if not self.positional_mean:
            return means[y]
        if self.lloyd_mean:
            return means[y] + decode_with_levels(
                getattr(self, f"class_mean_levels_{level}"), y,
                getattr(self, f"class_mean_codes_{level}")[y, pos_index], self.mean_bits)
        if self.quantized_mean:
            return means[y] + dequantize_rows(
                getattr(self, f"class_mean_low_{level}")[y],
                getattr(self, f"class_mean_step_{level}")[y],
                getattr(self, f"class_mean_codes_{level}")[y, pos_index],
                self.mean_bits, self.channels[level])
        if not self.low_rank_mean:
            return means[y, pos_index]
        basis = getattr(self, f"class_mean_basis_{level}")[y, pos_index].float()  # (N, r)
        loading = getattr(self, f"class_mean_loading_{level}")[y].float()  # (N, r, D_l)
        return means[y] + torch.einsum("nr,nrd->nd", basis, loading)

    # -- flow.prototypes: fixed -------------------------------------------------------------
    @torch.no_grad()
    def freeze_prototypes(self, class_ids: list[int]) -> None:
        """Copy mu_{y,l} = P_l e_y of each class into its fixed row; read from there after."""
        ids = torch.as_tensor(class_ids, dtype=torch.long, device=self.embedding.device)
        for lvl in range(self.n_levels):
            getattr(self, f"proto_fixed_{lvl}")[ids] = self.protos[lvl](self.embedding[ids])
        self.proto_frozen[ids] = True

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

    @property
    def uses_film(self) -> bool:
        return self.cfg.class_conditioning and self.cfg.conditioning == "film"

    def condition(
        self,
        level: int,
        y: torch.Tensor,
        pos_index: torch.Tensor,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """c = [e_y, PE(pos), phi(sigma), A_l u_y(pos)]: y, pos_index, sigma (N,) ->
        (N, cond_dim).

        e_y is left out without class conditioning or with FiLM (it modulates the subnets
        instead), phi(sigma) without a noise embedding (sigma None means clean data), the mean
        content without ``mean_condition_dim``.
        """
        parts = [self.positions(level)[pos_index]]
        if self.cfg.class_conditioning and not self.uses_film:
            parts.insert(0, self.embedding[y])
        if self.cfg.noise_dim > 0:
            if sigma is None:
                sigma = torch.zeros(y.shape[0], device=y.device)
            parts.append(noise_embedding(sigma.float(), self.cfg.noise_dim))
        if self.cfg.mean_condition_dim:
            parts.append(self.mean_projs[level](self.mean_content(level, y, pos_index)))
        return torch.cat(parts, dim=-1)

    def mean_content(self, level: int, y: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
        """u_y(p) = (m_y(p) - mean_p m_y(p)) / s_y: what class y's normal images hold at
        position p relative to the class's average, in units of its deviations; y, pos_index
        (N,) -> (N, D_l). Zero for a class whose statistics are not set yet."""
        means, std = self.class_stats(level)
        centre = means[y] if self.compact_mean else means.mean(dim=1)[y]
        return mean_content(self._class_mean(level, y, pos_index), centre, std[y])

    def prototype(self, level: int, y: torch.Tensor) -> torch.Tensor:
        """mu_{y,l}: y (M,) -> (M, D_l). P_l e_y, or the fixed copy of a class whose
        prototype was frozen (``flow.prototypes: fixed``)."""
        mu = self.protos[level](self.embedding[y])
        if self.cfg.prototypes != "fixed":
            return mu
        frozen = self.proto_frozen[y]
        return torch.where(frozen[:, None], getattr(self, f"proto_fixed_{level}")[y], mu)

    def _flow_inputs(
        self, level: int, y: torch.Tensor, pos_index: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, Any]:
        """What level ``level``'s flow takes besides x (or z), forward and inverse alike: the
        condition, warm-up, FiLM table and index, class ActNorm, adapter route."""
        # FiLM from the embedding table, indexed after the linear map: once per class, not per
        # vector (a batch holds a few classes and thousands of vectors)
        actnorm = None
        if self.cfg.class_actnorm:
            per_class = getattr(self, f"actnorm_{level}")[y]  # (N, K, 2, D)
            actnorm = (per_class[:, :, 0], per_class[:, :, 1])
        return {
            "cond": self.condition(level, y, pos_index, sigma),
            "warm": self.warm(),
            "film": self.embedding if self.uses_film else None,
            "actnorm": actnorm,
            "film_index": y if self.uses_film else None,
            "route": self.adapter_route(y),
        }

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
        if self.cfg.feature_norm:
            mean, std = self.feature_stats(level)
            x = (x - mean) / std
        elif self.cfg.class_norm:
            std = self.class_stats(level)[1][y]
            x = (x - self._class_mean(level, y, pos_index)) / std
        z, logdet, scale_sq = self.flows[level](x, **self._flow_inputs(level, y, pos_index, sigma))
        if self.cfg.feature_norm:
            logdet = logdet - std.log().sum()
        elif self.cfg.class_norm:
            logdet = logdet - std.log().sum(dim=-1)
        mu = self.prototype(level, y) if self.cfg.prior == "class_mixture" else None
        log_prob = log_normal(z, mu) + logdet
        return LevelOutput(z=z, logdet=logdet, scale_sq=scale_sq, log_prob=log_prob, mu=mu)

    @torch.no_grad()
    def inverse_level(
        self, level: int, z: torch.Tensor, y: torch.Tensor, pos_index: torch.Tensor
    ) -> torch.Tensor:
        """x = f_l^{-1}(z; c), back in raw feature units: z, y, pos_index (N,...) -> (N, D_l).

        The inverse of :meth:`forward_level`'s map (normalization undone too), for clean data
        (no noise level).
        """
        x = self.flows[level].inverse(z, **self._flow_inputs(level, y, pos_index, None))
        if self.cfg.feature_norm:
            mean, std = self.feature_stats(level)
            return x * std + mean
        if self.cfg.class_norm:
            return x * self.class_stats(level)[1][y] + self._class_mean(level, y, pos_index)
        return x

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        if self.has_adapters:
            adapters = {"count": self.n_adapters, "rank": self.adapter_rank}
            if self.adapter_film_rank:
                adapters["film_rank"] = self.adapter_film_rank
            if self.adapter_storage != "float32":
                adapters["storage"] = self.adapter_storage
            if self.adapters_stacked:
                adapters["stacked"] = True
            extra = {"adapters": adapters, **extra}
        lora = ADAPTER_STORAGE[self.adapter_storage]
        return {
            "state_dict": {k: v.detach().cpu().to(lora) if ".lora_" in k else v.detach().cpu()
                           for k, v in self.state_dict().items()},
            "channels": self.channels,
            "grids": self.grids,
            "n_classes": self.n_classes,
            "heads": {name: _head_shapes(h) for name, h in self.heads.items()},
            **extra,
        }

    @staticmethod
    def from_checkpoint(ckpt: dict[str, Any], cfg: CCNFSpec) -> CCNF:
        if "state_dict" not in ckpt:
            raise CcnfError(
                f"checkpoint holds a '{ckpt.get('kind', '?')}' model, not CCNF (model.kind)",
                fix="model.kind changed since this checkpoint was written: dvc repro",
            )
        # building the module draws random inits that load_state_dict then overwrites: keep
        # them off the global stream so what the caller draws next does not depend on them
        with torch.random.fork_rng(devices=[]):
            adapters = ckpt.get("adapters", {"count": 0, "rank": 0})
            model = CCNF(ckpt["channels"], ckpt["grids"], cfg, n_classes=ckpt["n_classes"],
                         n_adapters=adapters["count"], adapter_rank=adapters["rank"],
                         adapter_film_rank=adapters.get("film_rank", 0),
                         adapter_storage=adapters.get("storage", "float32"),
                         adapter_stacked=adapters.get("stacked", False))
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


def _head_shapes(head: nn.Module) -> list[list[int]]:
    """A head is a ModuleList of bias-free Linear layers: its [out, in] shapes rebuild it."""
    return [list(m.weight.shape) for m in head.modules() if isinstance(m, nn.Linear)]


def _head_from_shapes(shapes: list[list[int]]) -> nn.Module:
    return nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)


def _low_rank(mean_map: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular components of a mean map less its channel mean:
    M - mu ~= B L with B = U_r S_r^(1/2) (P, r) and L = S_r^(1/2) V_r^T (r, D), in
    :data:`MEAN_FACTOR_DTYPE` (zero columns beyond min(P, D))."""
    centred = (mean_map - mean_map.mean(dim=0)).double()
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    basis = mean_map.new_zeros(mean_map.shape[0], rank, dtype=torch.float64)
    loading = mean_map.new_zeros(rank, mean_map.shape[1], dtype=torch.float64)
    basis[:, :k] = u[:, :k] * root
    loading[:k] = root[:, None] * vh[:k]
    return basis.to(MEAN_FACTOR_DTYPE), loading.to(MEAN_FACTOR_DTYPE)
