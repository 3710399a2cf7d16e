"""A stack of conditional affine couplings with fixed random permutations between them."""

from __future__ import annotations

import torch
from torch import nn

from ccnf.flows.adapters import AdapterRoute
from ccnf.flows.coupling import ConditionalAffineCoupling
from ccnf.flows.permutation import half_swap_permutations


class ConditionalFlow(nn.Module):
    """z = f(x; c) = (P_K o C_K o ... o P_1 o C_1)(x), C_k affine couplings, P_k permutations.

    forward(x (N, D), cond (N, K), warm, film (N, F) or None, actnorm or None) -> (z (N, D),
    logdet (N,), scale_sq (N,)) where scale_sq is the mean of s^2 over all couplings'
    log-scales (for L_scale_penalty); ``film`` modulates every coupling's subnet when
    ``film_dim`` > 0. ``actnorm`` = (log_scale, shift), each (N, n_couplings, D): a per-sample
    elementwise affine x <- x * exp(log_scale_k) + shift_k before coupling k (log-det
    sum(log_scale_k)); CCNF feeds it per class (``flow.class_actnorm``). ``route``
    (:class:`ccnf.flows.adapters.AdapterRoute`) picks each vector's low-rank adapter in every
    coupling (see :meth:`add_adapter`).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        *,
        n_couplings: int,
        hidden_dim: int,
        clamp_alpha: float,
        spectral_norm: bool,
        film_dim: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.couplings = nn.ModuleList(
            ConditionalAffineCoupling(
                dim,
                cond_dim,
                hidden_dim,
                clamp_alpha=clamp_alpha,
                spectral_norm=spectral_norm,
                film_dim=film_dim,
            )
            for _ in range(n_couplings)
        )
        # x_a of each coupling becomes the next one's transformed half (drawn from the global RNG)
        perms, inv_perms = half_swap_permutations(dim, n_couplings)
        self.register_buffer("perms", perms)
        self.register_buffer("inv_perms", inv_perms)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        warm: float = 1.0,
        film: torch.Tensor | None = None,
        actnorm: tuple[torch.Tensor, torch.Tensor] | None = None,
        film_index: torch.Tensor | None = None,
        route: AdapterRoute | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        scale_sq = x.new_zeros(x.shape[0])
        for k, (coupling, perm) in enumerate(zip(self.couplings, self.perms, strict=True)):
            if actnorm is not None:
                log_scale = actnorm[0][:, k]
                x = x * log_scale.exp() + actnorm[1][:, k]
                logdet = logdet + log_scale.sum(dim=-1)
            x, ld, s = coupling(x, cond, warm, film, film_index, route)
            # index_select, not x[:, perm]: same values (and gradients: perm is a bijection, so
            # every gradient entry is a single copied value), ~4x cheaper than advanced indexing
            x = x.index_select(1, perm)
            logdet = logdet + ld
            scale_sq = scale_sq + s.pow(2).mean(dim=-1)
        return x, logdet, scale_sq / len(self.couplings)

    def inverse(
        self,
        z: torch.Tensor,
        cond: torch.Tensor,
        warm: float = 1.0,
        film: torch.Tensor | None = None,
        actnorm: tuple[torch.Tensor, torch.Tensor] | None = None,
        film_index: torch.Tensor | None = None,
        route: AdapterRoute | None = None,
    ) -> torch.Tensor:
        for k in reversed(range(len(self.couplings))):
            z = self.couplings[k].inverse(z.index_select(1, self.inv_perms[k]), cond, warm, film,
                                          film_index, route)
            if actnorm is not None:
                z = (z - actnorm[1][:, k]) * (-actnorm[0][:, k]).exp()
        return z

    def add_adapter(
        self, rank: int, film_rank: int = 0, stacked: bool = False
    ) -> list[nn.Parameter]:
        """A new rank-``rank`` adapter in every coupling (FiLM map: ``film_rank``, 0: none;
        ``stacked``: adding to the earlier ones); returns its parameters."""
        return [p for coupling in self.couplings
                for p in coupling.add_adapter(rank, film_rank, stacked)]
