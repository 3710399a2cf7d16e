"""Per-task low-rank adapters of a linear map (LoRA, Hu et al. 2021), for parameter isolation.

A frozen map h = W x + b gets, for task k, the delta

    delta_k(x) = (x A_k^T) B_k^T,     A_k (r, in), B_k (out, r),

so the map that task k's classes see is (W + B_k A_k) x + b. Each vector of a batch names its
adapter (``index``; -1: none, the frozen map alone), so one batch may mix classes of different
tasks. Every adapter is a separate pair of tensors: training adapter k cannot move another one
through a shared tensor (weight decay, moments). B_k starts at zero, so a new adapter leaves the
map unchanged until it is trained; A_k ~ N(0, 1/in) from the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankAdapters(nn.Module):
    """The adapters of one linear map R^in -> R^out, one per task that added one.

    forward(x (N, in), index (N,) long) -> delta (N, out): zero rows where index < 0.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, count: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for _ in range(count):
            self.add()

    def __len__(self) -> int:
        return len(self.a)

    def add(self) -> int:
        """Append a new adapter (B = 0: no change yet); returns its index."""
        device = self.a[0].device if len(self.a) else torch.device("cpu")
        a = torch.randn(self.rank, self.in_dim) / math.sqrt(self.in_dim)
        self.a.append(nn.Parameter(a.to(device)))
        self.b.append(nn.Parameter(torch.zeros(self.out_dim, self.rank, device=device)))
        return len(self.a) - 1

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        """The two tensors of adapter k."""
        return [self.a[k], self.b[k]]

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        present = [k for k in torch.unique(index).tolist() if k >= 0]
        if len(present) == 1 and bool((index == present[0]).all()):
            k = present[0]  # the whole batch uses adapter k: no gather
            return (x @ self.a[k].t()) @ self.b[k].t()
        delta = x.new_zeros(x.shape[0], self.out_dim)
        for k in present:
            rows = torch.nonzero(index == k).squeeze(1)
            delta = delta.index_add(0, rows, (x[rows] @ self.a[k].t()) @ self.b[k].t())
        return delta
