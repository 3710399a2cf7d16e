"""2-D sinusoidal positional encoding of patch positions (as in CFlow-AD)."""

from __future__ import annotations

import math

import torch


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Encode each (row, col) of a height x width grid.

    The first dim/2 channels encode the column, the last dim/2 the row, each as interleaved
    sin/cos pairs with frequencies 1 / 10000^(2i / (dim/2)).

    Returns: (height * width, dim), row-major over the grid (matching ``x.flatten(2)``).
    """
    if dim % 4 != 0:
        raise ValueError(f"positional encoding dim must be a multiple of 4, got {dim}")
    if dim == 0:
        return torch.zeros(height * width, 0)
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freq  # (W, half/2)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freq  # (H, half/2)
    col_enc = torch.stack([cols.sin(), cols.cos()], dim=-1).flatten(1)  # (W, half)
    row_enc = torch.stack([rows.sin(), rows.cos()], dim=-1).flatten(1)  # (H, half)
    pe = torch.cat(
        [col_enc[None, :, :].expand(height, -1, -1), row_enc[:, None, :].expand(-1, width, -1)],
        dim=-1,
    )
    return pe.reshape(height * width, dim).float()
