"""Conditional affine coupling (RealNVP) with the CCNF stabilizers.

Split x = [x_a, x_b]; h = W_1 [x_a, c] + b_1; with FiLM h <- h * (1 + gamma(e)) + beta(e);
(s_raw, t) = W_2 relu(h) + b_2;
  s = alpha * tanh(s_raw / alpha) * w      (soft clamp, stabilizer 2; warm-up w, stabilizer 3)
  y = [x_a, x_b * exp(s) + t],   log|det dy/dx| = sum(s).
The subnet's linear layers are :class:`SNLinear` (spectral norm, stabilizer 1). The transform
itself is :mod:`ccnf.flows.affine`, the clamp and warm-up :mod:`ccnf.flows.log_scale` (shared
with the FastFlow baseline's convolutional coupling).
w = min(1, step / warmup_steps) goes from 0 (additive, volume preserving) to 1 (affine).

FiLM (feature-wise linear modulation, Perez et al. 2018): a second condition e (the class
embedding) scales and shifts the hidden units instead of being concatenated to the input, so
the class changes the subnet's function rather than only its bias. gamma and beta come from one
linear map initialized to zero: at initialization the coupling ignores e.

Adapters (``train.strategy: adapters``): :meth:`add_adapter` gives both subnet layers a new
low-rank delta (:mod:`ccnf.flows.adapters`), and with ``film_rank`` > 0 the FiLM map too
(gamma, beta) = (W_f + B_k A_k) e + b_f: a frozen FiLM map trained on the first task's few
classes spans only the modulations those classes needed, so a new class's embedding alone
cannot reach others. ``route`` (an :class:`AdapterRoute`) says which adapter each vector uses
(-1: the shared weights alone). A coupling that never got one has no adapter tensors at all.
"""

from __future__ import annotations

import torch
from torch import nn

from ccnf.flows.adapters import AdapterRoute, LowRankAdapters
from ccnf.flows.affine import coupling_forward, coupling_inverse
from ccnf.flows.log_scale import clamped_log_scale
from ccnf.flows.spectral import SNLinear


class ConditionalAffineCoupling(nn.Module):
    """One affine coupling block.

    forward(x (N, D), cond (N, K), warm in [0, 1], film, film_index, route)
        -> (y (N, D), logdet (N,), s (N, D - D//2)).
    ``film_dim`` F > 0 enables FiLM modulation by ``film``: (N, F), one row per vector, or a
    table (C, F) with ``film_index`` (N,) picking each vector's row (gamma and beta are then
    computed once per row of the table, not once per vector: the same values, C instead of N
    products); 0 disables it.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        hidden_dim: int,
        *,
        clamp_alpha: float,
        spectral_norm: bool,
        film_dim: int = 0,
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"coupling needs at least 2 dimensions, got {dim}")
        self.dim_a = dim // 2
        self.dim_b = dim - self.dim_a
        self.clamp_alpha = clamp_alpha
        self.hidden = SNLinear(self.dim_a + cond_dim, hidden_dim, enabled=spectral_norm)
        self.out = SNLinear(hidden_dim, 2 * self.dim_b, enabled=spectral_norm)
        self.act = nn.ReLU()
        self.film: nn.Linear | None = None
        if film_dim > 0:
            self.film = nn.Linear(film_dim, 2 * hidden_dim)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.lora_hidden: LowRankAdapters | None = None
        self.lora_out: LowRankAdapters | None = None
        self.lora_film: LowRankAdapters | None = None

    def add_adapter(
        self, rank: int, film_rank: int = 0, stacked: bool = False
    ) -> list[nn.Parameter]:
        """A new adapter on both subnet layers (and of rank ``film_rank`` on the FiLM map when
        > 0; ``stacked``: each adds to the ones before it, :class:`LowRankAdapters`); returns
        its parameters."""
        if film_rank > 0 and self.film is None:
            raise ValueError("FiLM adapters need FiLM conditioning (flow.conditioning: film)")
        device = self.out.weight.device
        if self.lora_hidden is None or self.lora_out is None:
            (h_out, h_in), (o_out, o_in) = self.hidden.weight.shape, self.out.weight.shape
            self.lora_hidden = LowRankAdapters(h_in, h_out, rank, stacked=stacked).to(device)
            self.lora_out = LowRankAdapters(o_in, o_out, rank, stacked=stacked).to(device)
        if film_rank > 0 and self.lora_film is None and self.film is not None:
            f_out, f_in = self.film.weight.shape
            self.lora_film = LowRankAdapters(f_in, f_out, film_rank, stacked=stacked).to(device)
        if (self.lora_film is not None) != (film_rank > 0) or (
                self.lora_film is not None and len(self.lora_film) != len(self.lora_hidden)):
            raise ValueError("every adapter of a coupling has a FiLM part or none has")
        k = self.lora_hidden.add()
        self.lora_out.add()
        new = [*self.lora_hidden.adapter_parameters(k), *self.lora_out.adapter_parameters(k)]
        if self.lora_film is not None:
            self.lora_film.add()
            new += self.lora_film.adapter_parameters(k)
        return new

    def _scale_shift(
        self,
        x_a: torch.Tensor,
        cond: torch.Tensor,
        warm: float,
        film: torch.Tensor | None,
        film_index: torch.Tensor | None = None,
        route: AdapterRoute | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inp = torch.cat([x_a, cond], dim=-1)
        h = self.hidden(inp)
        lora = self.lora_hidden is not None and route is not None
        if lora:
            h = h + self.lora_hidden(inp, route)
        if self.film is not None:
            if film is None:
                raise ValueError("this coupling uses FiLM: pass the film condition")
            mod = self.film(film)
            if self.lora_film is not None and route is not None:
                rows = route if film_index is None else route.table
                if rows is None:
                    raise ValueError("FiLM adapters on a class table need route.table")
                mod = mod + self.lora_film(film, rows)
            if film_index is not None:
                mod = mod[film_index]
            gamma, beta = mod.chunk(2, dim=-1)
            h = h * (1 + gamma) + beta
        h = self.act(h)
        out = self.out(h)
        if lora:
            out = out + self.lora_out(h, route)
        s_raw, t = out.chunk(2, dim=-1)
        return clamped_log_scale(s_raw, self.clamp_alpha, warm), t

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        warm: float = 1.0,
        film: torch.Tensor | None = None,
        film_index: torch.Tensor | None = None,
        route: AdapterRoute | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, s = coupling_forward(
            x, self.dim_a,
            lambda x_a: self._scale_shift(x_a, cond, warm, film, film_index, route),
        )
        return y, s.sum(dim=-1), s

    def inverse(
        self,
        y: torch.Tensor,
        cond: torch.Tensor,
        warm: float = 1.0,
        film: torch.Tensor | None = None,
        film_index: torch.Tensor | None = None,
        route: AdapterRoute | None = None,
    ) -> torch.Tensor:
        return coupling_inverse(
            y, self.dim_a,
            lambda y_a: self._scale_shift(y_a, cond, warm, film, film_index, route),
        )
