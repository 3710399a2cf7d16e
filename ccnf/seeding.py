"""Every seed of the study, derived from ``params.seed`` in one place.

Each random stream has a name and a multiplier; a stream's seed is
``seed * multiplier + index`` (index: the task, or the class). The multipliers are distinct
primes so that two streams of one study differ whenever ``seed`` > 0 and the indices are small;
they are kept as the pipeline first used them, since changing one changes every trained model
(with ``seed: 0`` every stream of task t is seeded with t: the streams feed different
generators, so equal seeds draw unrelated values).
"""

from __future__ import annotations

import random

import numpy as np
import torch

STREAMS: dict[str, int] = {
    "task": 1009,       # the global torch/numpy/random state at the start of a train stage
    "batches": 7919,    # the CPU generator of a task's image order, positions and loss samples
    "replay": 104729,   # which images a task adds to the replay buffer
    "generate": 15485863,  # generative replay: the latents of a task's generated features
}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """Seed of stream ``stream`` (a key of :data:`STREAMS`) for task or class ``index``."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: one of {', '.join(STREAMS)}")
    return seed * STREAMS[stream] + index


def class_seed(seed: int, class_index: int) -> int:
    """Seed of one class's per-class model (the baselines): it depends on the study seed and
    the class's global index only, so a class's model is the same whichever classes were
    learned before it. An affine map mod 2**63 (a seed torch accepts)."""
    return (seed * 1_000_003 + class_index * 7_919 + 17) % 2**63
