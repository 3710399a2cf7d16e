"""Fixed random permutations between coupling blocks.

A coupling of D dimensions leaves x_a = x[:, :D//2] unchanged. Permutation k sends that half
into the half the next coupling transforms, shuffled within halves:
    P_k = [D//2 + randperm(D - D//2), randperm(D//2)]
so every dimension is transformed at least every second coupling (purely random permutations
leave some dimensions untouched, and an untouched raw feature then dominates ||z||^2).
"""

from __future__ import annotations

import torch


def half_swap_permutations(dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n permutations of range(dim) drawn from the global RNG -> (perms (n, dim), their
    inverses (n, dim)), int64; apply as x[:, perms[k]] (or x.index_select(1, perms[k]))."""
    d_a = dim // 2
    perms = torch.stack(
        [torch.cat([d_a + torch.randperm(dim - d_a), torch.randperm(d_a)]) for _ in range(n)]
    )
    return perms, torch.argsort(perms, dim=1)
