"""Random patch positions per image, for training on a subset of each feature map.

For b images on a grid of hw positions, k positions per image without replacement:
    pos = argsort(U) [:, :k],   U ~ Uniform(0, 1)^(b x hw) from the given CPU generator
(all positions, in order, when k is None or k >= hw; then nothing is drawn). The draws are
made on the CPU, so they are the same on every device.
"""

from __future__ import annotations

import torch


def sample_positions(b: int, hw: int, k: int | None, gen: torch.Generator) -> torch.Tensor:
    """(b, min(k, hw)) flat grid positions (int64, CPU), distinct within each row."""
    if k is None or k >= hw:
        return torch.arange(hw).expand(b, hw)
    return torch.rand(b, hw, generator=gen).argsort(dim=1)[:, :k]


def gather_patches(
    feats: torch.Tensor, images: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """feats (N, P, D) patch vectors of N images, images (b,), pos (b, k) -> (b * k, D),
    image-major: row i * k + j is image images[i] at position pos[i, j]."""
    return feats[images[:, None], pos].reshape(-1, feats.shape[-1])
