"""Per-task low-rank adapters of a linear map (LoRA, Hu et al. 2021), for parameter isolation.

A frozen map h = W x + b gets, for task k, the delta

    delta_k(x) = (x A_k^T) B_k^T,     A_k (r, in), B_k (out, r),

so the map that task k's classes see is (W + B_k A_k) x + b. Each vector of a batch names its
adapter (``index``; -1: none, the frozen map alone), so one batch may mix classes of different
tasks. Every adapter is a separate pair of tensors: training adapter k cannot move another one
through a shared tensor (weight decay, moments). B_k starts at zero, so a new adapter leaves the
map unchanged until it is trained; A_k ~ N(0, 1/in) from the global RNG.

Stacked adapters (``stacked=True``, ``train.adapter_stack``): adapter k stands for the sum of
adapters 0..k, delta_k(x) = sum_{j <= k} (x A_j^T) B_j^T. Each task still stores only its own
pair, but its classes see every earlier task's change as well, so the rank available to task k
grows as r (k + 1) while a frozen pair never moves: an earlier adapter's delta is unchanged by
later ones, and a new pair starts from the map the previous task ended with (B_k = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AdapterRoute:
    """Which adapter each vector of a batch uses, resolved once per flow pass (every layer of
    every coupling reads it): ``whole`` = the one adapter of the whole batch (-1: none), or,
    for a batch that mixes them, ``present`` = the adapters it uses (ascending, -1 left out)
    with either ``groups`` = the row indices of each (``exact``: every row's delta is
    computed from its own adapter alone, bit-identical however many others exist) or
    ``mask`` (N, P) float, 1 where vector n uses adapter present[p] (one pass for all).
    ``table`` is the route of a per-class table's rows (the FiLM map reads the class-embedding
    table, one row per class, not one per vector); None where no table is read.
    """

    whole: int | None
    present: tuple[int, ...] = ()
    groups: tuple[torch.Tensor, ...] = ()
    mask: torch.Tensor | None = None
    table: AdapterRoute | None = None

    @staticmethod
    def of(
        index: torch.Tensor, table: torch.Tensor | None = None, *, exact: bool = False
    ) -> AdapterRoute:
        """The route of ``index`` (N,) long, the adapter of each vector (-1: none); ``table``
        (C,) long, the adapter of each row of a per-class table, gives :attr:`table` (always
        ``exact``: a class's FiLM values must not move when later tasks add adapters)."""
        table_route = AdapterRoute.of(table, exact=True) if table is not None else None
        present = torch.unique(index).tolist()
        if len(present) == 1:
            return AdapterRoute(present[0], table=table_route)
        used = tuple(k for k in present if k >= 0)
        if exact:
            rows = tuple(torch.nonzero(index == k).squeeze(1) for k in used)
            return AdapterRoute(None, used, groups=rows, table=table_route)
        # float once here, not in every layer that reads it
        mask = (index[:, None] == torch.as_tensor(
            used, dtype=index.dtype, device=index.device)).float()
        return AdapterRoute(None, used, mask=mask, table=table_route)


class LowRankAdapters(nn.Module):
    """The adapters of one linear map R^in -> R^out, one per task that added one.

    forward(x (N, in), route) -> delta (N, out): zero rows of vectors without an adapter;
    ``route`` is an :class:`AdapterRoute` or the (N,) long index it is made of. ``stacked``:
    adapter k is the sum of adapters 0..k (see the module docstring).
    """

    def __init__(
        self, in_dim: int, out_dim: int, rank: int, count: int = 0, *, stacked: bool = False
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.stacked = stacked
        # an empty ParameterList follows no .to(): this empty buffer does, and tells the first
        # adapter where to go (not persistent: no checkpoint key)
        self.register_buffer("anchor", torch.empty(0), persistent=False)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for _ in range(count):
            self.add()

    def __len__(self) -> int:
        return len(self.a)

    def add(self) -> int:
        """Append a new adapter (B = 0: no change yet); returns its index."""
        device = self.anchor.device
        # drawn on the CPU generator whatever the device: the same adapters on CPU and GPU
        a = torch.randn(self.rank, self.in_dim) / math.sqrt(self.in_dim)
        self.a.append(nn.Parameter(a.to(device)))
        self.b.append(nn.Parameter(torch.zeros(self.out_dim, self.rank, device=device)))
        return len(self.a) - 1

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        """The two tensors of adapter k."""
        return [self.a[k], self.b[k]]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r', in), B (out, r')) of what adapter k adds, delta_k(x) = (x A^T) B^T: its own
        pair (r' = r), or with ``stacked`` the pairs 0..k side by side (r' = r (k + 1))."""
        if not self.stacked or k == 0:
            return self.a[k], self.b[k]
        return (torch.cat(list(self.a[: k + 1])),
                torch.cat(list(self.b[: k + 1]), dim=1))

    def forward(self, x: torch.Tensor, route: AdapterRoute | torch.Tensor) -> torch.Tensor:
        if isinstance(route, torch.Tensor):
            route = AdapterRoute.of(route)
        if route.whole is not None and route.whole >= 0:
            a, b = self.factors(route.whole)  # the whole batch uses adapter k: no gather
            return (x @ a.t()) @ b.t()
        if route.mask is None:
            delta = x.new_zeros(x.shape[0], self.out_dim)
            for k, rows in zip(route.present, route.groups, strict=True):
                a, b = self.factors(k)
                delta = delta.index_add(0, rows, (x[rows] @ a.t()) @ b.t())
            return delta
        if self.stacked:
            # vector n of adapter k takes pairs 0..k: one pass over pairs 0..max(present)
            count = route.present[-1] + 1
            used = torch.as_tensor(route.present, device=x.device)
            own = torch.where(route.mask.bool().any(dim=1),
                              used[route.mask.argmax(dim=1)], -1)  # (N,) adapter of each
            pairs = torch.arange(count, device=x.device)
            keep = (own[:, None] >= pairs[None, :]).to(x.dtype)  # (N, count)
            a, b = self.factors(count - 1)
            return ((x @ a.t()) * keep.repeat_interleave(self.rank, dim=1)) @ b.t()
        # a mixed training batch (flow.class_adapter_rank: each class of the batch has its
        # own): every vector through the stacked factors of the adapters present, each
        # vector's rank-r block of x A^T kept for its own adapter only: two products for any
        # number of adapters instead of two per adapter
        a = torch.cat([self.a[k] for k in route.present])  # (P r, in)
        b = torch.cat([self.b[k] for k in route.present], dim=1)  # (out, P r)
        keep = route.mask.to(x.dtype).repeat_interleave(self.rank, dim=1)  # (N, P r)
        return ((x @ a.t()) * keep) @ b.t()
