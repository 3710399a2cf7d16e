"""A task's training schedule: how many optimizer steps, and the learning rate at each.

Budget. A task over N training images in batches of ``train.images_per_step`` has
S_e = ceil(N / images_per_step) steps per epoch and trains for

    steps = max(train.epochs * S_e, train.min_steps_per_class * K)

optimizer steps (K = classes the task learns): the epochs set the budget for well-populated
classes, the floor keeps a few-shot class (N of 8 images gives S_e = 1) from ending after a
handful of steps. Epoch e of a step is step // S_e (for ``train.sub_epochs``).

Learning rate at step i of n (one round; ``train.meta_epochs`` repeats rounds on task 0):

    lr_i = lr * warm_i * decay_i,   warm_i = min(1, (i + 1) / train.lr_warmup_steps),
    decay_i = 1 (constant) or 0.5 (1 + cos(pi i / n)) (cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainSpec:
    """The plain training hyper-parameters a model's optimizer loop reads (the ``train``
    section of params.yaml; :meth:`of` copies them), so the torch code never sees the schema."""

    epochs: int
    min_steps_per_class: int
    images_per_step: int
    patches_per_image: int | None
    lr: float
    weight_decay: float
    grad_clip: float | None
    lr_schedule: str  # constant | cosine
    lr_warmup_steps: int

    @staticmethod
    def of(train: Any) -> TrainSpec:
        """The spec of ``train`` (a :class:`ccnf.config.TrainConfig`)."""
        return TrainSpec(**{f.name: getattr(train, f.name) for f in fields(TrainSpec)})


@dataclass(frozen=True)
class StepBudget:
    """steps_per_epoch S_e and total optimizer steps of one round of a task."""

    steps_per_epoch: int
    steps: int

    @staticmethod
    def of(n_images: int, n_classes: int, train: TrainSpec) -> StepBudget:
        per_epoch = math.ceil(n_images / train.images_per_step)
        steps = max(train.epochs * per_epoch, train.min_steps_per_class * n_classes)
        return StepBudget(per_epoch, steps)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def lr_factor(step: int, total: int, train: TrainSpec) -> float:
    """Multiplier of ``train.lr`` at step ``step`` of ``total`` (see the module docstring)."""
    warm = 1.0
    if train.lr_warmup_steps > 0:
        warm = min(1.0, (step + 1) / train.lr_warmup_steps)
    if train.lr_schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return warm
