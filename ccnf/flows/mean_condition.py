"""The mean-content condition (``flow.mean_condition_dim``), shared by CCNF and the flow bank.

A class's mean feature map m(p) (one vector per grid position, kept for the input
normalization) says what a normal image of the class holds at p. The condition gives every
coupling A_l u(p) with

    u(p) = (m(p) - mean_p m(p)) / s        the content relative to the class's average, in
                                           units of its deviations s (D_l,)

and A_l a learned D_l -> k map per level.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import nn


def mean_condition_maps(channels: Sequence[int], k: int) -> nn.ModuleList:
    """A_l for every level of ``channels`` (D_l -> k linear maps), drawn from their own seeded
    stream: their start does not depend on what was drawn before them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(b"mean_condition"))
        return nn.ModuleList(nn.Linear(d, k) for d in channels)


def mean_content(mean_at: torch.Tensor, centre: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """u(p) = (m(p) - centre) / std: mean_at (N, D) the map at each vector's position, centre
    (N, D) or (D,) its average over positions, std (N, D) or (D,) -> (N, D)."""
    return (mean_at - centre) / std
