"""The contract every model of the study implements, and the checkpoint that carries it.

A model (``model.kind``: CCNF, each per-class baseline, a test's toy model) is built empty by
the init stage, learns one task at a time in the train stages and scores in the evaluate
stage; the pipeline (:mod:`ccnf.train`, :mod:`ccnf.evaluate`, the CLI) only ever talks to
this contract, never to a kind. Feature lists follow the cache: ``features[l]`` is
(N, C_l, H_l, W_l) at level l.

Checkpoint (``models/<task>/model.pt``, pickle-free, :mod:`ccnf.store`)::

    {"format": CHECKPOINT_FORMAT, "kind": model.kind, "classes": [seen classes, task order],
     "task": index of the task that wrote it (-1: init),
     "calibration": {class: PatchScores record of its held-out normal training images},
     **model.state()}                           # the kind's own keys (weights, specs, ...)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from rich.console import Console

from ccnf.errors import CcnfError
from ccnf.patch_scores import PatchScores
from ccnf.store import load_artifact, recovery_fix

if TYPE_CHECKING:
    from ccnf.config import Params
    from ccnf.features import FeatureMeta, FeatureSplit

# version of the checkpoint layout above; a file of another version is refused, not guessed at
CHECKPOINT_FORMAT = 2
RESERVED_KEYS = ("format", "kind", "classes", "task", "calibration")
#: folder of a task's snapshots (``eval.test_selected``, leaky) inside its model folder
SNAPSHOTS = "snapshots"


@dataclass
class TaskInputs:
    """What a task gives the model to learn.

    task: the task's index t; name: its name (``t0``...); classes: {class name: its fit
    images (the training split minus the calibration slice)} in task order, empty when the
    task adds nothing (``joint`` after task 0);
    fit_indices: {class: train-split indices of its fit images};
    load: (class, train-split indices) -> those training images (a FeatureSplit), for a
    strategy that revisits earlier classes' stored images (replay);
    after_step: called by a model that trains in steps after each one with (steps done,
    total steps), e.g. to keep snapshots (``eval.test_selected``); None: nobody listens.
    """

    task: int
    name: str
    classes: dict[str, FeatureSplit]
    fit_indices: dict[str, list[int]]
    load: Any
    after_step: Callable[[int, int], None] | None = None


class AnomalyModel(ABC):
    """One anomaly model over every class learned so far.

    Class attributes say what the kind supports; :class:`ccnf.config.Params` checks the
    params against them, so a combination the model cannot run is refused before any stage.
    """

    kind: ClassVar[str]
    #: map scores its patch scores hold (nf, latent, proto); hybrid follows from nf + proto
    map_scores: ClassVar[tuple[str, ...]] = ("nf", "latent")
    #: class selection methods of the task-agnostic setting (besides oracle)
    select_methods: ClassVar[tuple[str, ...]] = ("likelihood",)
    #: ``train.strategy`` values it implements
    strategies: ClassVar[tuple[str, ...]] = ("naive",)
    #: leading columns of its training log (train_log.tsv); other row keys follow
    log_columns: ClassVar[tuple[str, ...]] = ("step", "task", "epoch", "loss")

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(cls, params: Params, meta: FeatureMeta) -> AnomalyModel:
        """The empty, class-less model of the init stage (global RNG seeded by the caller)."""

    @classmethod
    @abstractmethod
    def restore(
        cls, ckpt: dict[str, Any], params: Params, meta: FeatureMeta | None,
        device: torch.device,
    ) -> AnomalyModel:
        """The model of a checkpoint; a checkpoint that does not fit the params (or, given
        ``meta``, the feature cache) is an error."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """The kind's checkpoint keys (tensors, JSON-able values; none of RESERVED_KEYS)."""

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Classes learned so far, in task order."""

    # -- learning ----------------------------------------------------------------------------
    @abstractmethod
    def learn_task(
        self, inputs: TaskInputs, params: Params, *, console: Console | None = None
    ) -> list[dict[str, float]]:
        """Learn the task's classes; returns one log row per optimizer step (may be empty).

        Afterwards :attr:`classes` ends with the task's classes. All randomness comes from
        generators seeded by the params (:mod:`ccnf.seeding`).
        """

    @classmethod
    def min_training_steps(cls, params: Params, tasks: list[dict[str, int]]) -> int:
        """The fewest optimizer steps :meth:`learn_task` takes over a whole run.

        tasks: per task, {class: its fit images} as the train stage hands them over (empty
        for a task that adds nothing, e.g. ``joint`` after task 0). Exact where a task
        trains on its own images only; images a strategy adds (a replay buffer, generated
        ones) can only lengthen epochs, so for those it is a lower bound. A kind that does
        not state it raises.
        """
        raise CcnfError(f"model.kind '{cls.kind}' does not state its training steps",
                        fix=f"implement {cls.__name__}.min_training_steps")

    # -- scoring -----------------------------------------------------------------------------
    @abstractmethod
    def patch_scores(
        self, features: list[torch.Tensor], classes: list[str], batch_images: int
    ) -> PatchScores:
        """Patch scores of N images, image i under class ``classes[i]`` (CPU, float32)."""

    @abstractmethod
    def select(
        self,
        features: list[torch.Tensor],
        candidates: list[str],
        batch_images: int,
        level: int | None,
    ) -> dict[str, np.ndarray]:
        """{method: (N,) index into ``candidates`` of each image's chosen class} for every
        method of :attr:`select_methods` (``score.select_level``: the level that decides, -1
        the deepest, None all)."""

    # -- memory ------------------------------------------------------------------------------
    def footprint(self) -> dict[str, int]:
        """What the model keeps: ``values`` and ``bytes`` of every tensor of :meth:`state`
        (weights, per-class rows and buffers; not the calibration scores), and
        ``stored_images``: training images of earlier tasks it keeps (replay), 0 if none."""
        tensors = list(_tensors(self.state()))
        return {
            "values": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "stored_images": 0,
        }

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self, *, task: int, calibration: dict[str, Any]) -> dict[str, Any]:
        """The whole checkpoint dict (layout in the module docstring)."""
        return self.checkpoint_of(self.state(), classes=self.classes, task=task,
                                  calibration=calibration)

    def checkpoint_of(
        self, state: dict[str, Any], *, classes: list[str], task: int,
        calibration: dict[str, Any],
    ) -> dict[str, Any]:
        """The checkpoint dict of ``state`` (this kind's keys, e.g. a snapshot's)."""
        clash = [k for k in RESERVED_KEYS if k in state]
        if clash:
            raise ValueError(f"{self.kind} state uses reserved checkpoint keys {clash}")
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "classes": list(classes),
            "task": task,
            "calibration": calibration,
            **state,
        }


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of dicts and lists."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``path``/model.pt: any model kind's checkpoint dict (pickle-free, see ccnf.store)."""
    file = Path(path) / "model.pt"
    if not file.is_file():
        raise CcnfError(f"checkpoint not found: {file}", fix="run the stage that writes it")
    ckpt = load_artifact(file, kind="checkpoint", fix=recovery_fix(file))
    if not isinstance(ckpt, dict):
        raise CcnfError(f"checkpoint {file} does not hold a dict", where=str(file),
                        fix=recovery_fix(file))
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(ckpt.get("kind"), str):
        raise CcnfError(
            f"checkpoint {file} has layout version {ckpt.get('format', 'none')}, this version "
            f"reads {CHECKPOINT_FORMAT} (with its model kind named)",
            where=str(file),
            fix="it was written by another version of ccnf: dvc repro re-trains the chain",
        )
    return ckpt
