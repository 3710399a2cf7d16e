"""Typed records of what the evaluate stage writes and the aggregate stage reads.

One place owns each file's layout, so neither side builds or splits key strings:

* :class:`TaskResult`: ``metrics/tasks/<task>.json``, one task's metrics (layout in
  :mod:`ccnf.evaluate`);
* :class:`ClassScores`: one class's raw image scores in ``eval/<task>/image_scores.npz``;
* :class:`GalleryItem`: one anomaly map of the gallery in ``eval/<task>/gallery.npz``.

The npz files are flat {key: array} maps (pickle-free, :mod:`ccnf.store`); the keys are
``<class>/labels``, ``<class>/<score>``, ``<class>/selected`` and ``<class>/agnostic/<score>``
for the scores, ``<class>/<k>/name``, ``<class>/<k>/mask`` and ``<class>/<k>/<score>`` for the
gallery. Class names never contain "/" (they are folder names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ccnf.errors import CcnfError
from ccnf.store import recovery_fix


@dataclass
class TaskResult:
    """Metrics after one task. per_class: {class: {"task": j, score: {metric: value}}};
    per_task: {task: {score: {metric: mean}}}; agnostic: the task-agnostic block;
    thresholds: {"k", "percentile", "per_class": {class: {score: {kind: t}}}};
    footprint: what the model keeps after the task
    (:meth:`ccnf.models.base.AnomalyModel.footprint`)."""

    task: str
    task_index: int
    class_select: str
    thresholds: dict[str, Any]
    per_class: dict[str, Any]
    per_task: dict[str, Any]
    agnostic: dict[str, Any]
    footprint: dict[str, int] = field(default_factory=dict)
    #: LEAKY (eval.test_selected): the best snapshot on the test set; empty when off
    test_selected: dict[str, Any] = field(default_factory=dict)

    KEYS = ("task", "task_index", "class_select", "per_class", "per_task", "agnostic")

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "task_index": self.task_index,
            "class_select": self.class_select,
            "thresholds": self.thresholds,
            "per_class": self.per_class,
            "per_task": self.per_task,
            "agnostic": self.agnostic,
            "footprint": self.footprint,
        } | ({"test_selected_leaky": self.test_selected} if self.test_selected else {})

    @staticmethod
    def from_json(raw: Any, path: Path, task: str) -> TaskResult:
        """The record in ``raw`` (read from ``path``), which must be task ``task``'s."""
        missing = [k for k in TaskResult.KEYS if not isinstance(raw, dict) or k not in raw]
        if missing == ["agnostic"]:
            raise CcnfError(
                f"{path} predates the task-agnostic evaluation (no 'agnostic' block)",
                fix="re-run the evaluation: dvc repro",
            )
        if missing or raw["task"] != task:
            raise CcnfError(
                f"{path} is not the evaluation of task {task} ("
                + (f"missing {', '.join(missing)}" if missing else f"it is of {raw['task']}")
                + ")",
                where=str(path),
                fix=recovery_fix(path),
            )
        return TaskResult(
            task=raw["task"], task_index=raw["task_index"], class_select=raw["class_select"],
            thresholds=raw.get("thresholds", {}), per_class=raw["per_class"],
            per_task=raw["per_task"], agnostic=raw["agnostic"],
            footprint=raw.get("footprint", {}),
            test_selected=raw.get("test_selected_leaky", {}),
        )


@dataclass
class ClassScores:
    """Raw image scores of one class's N test images.

    labels (N,) 0/1; scores: {score: (N,)} task-aware (image under its own class); selected:
    (N,) index into the seen classes of the class each image was scored under in the
    task-agnostic block (None when the block did not run); agnostic: {score: (N,)} there.
    """

    labels: np.ndarray
    scores: dict[str, np.ndarray]
    selected: np.ndarray | None = None
    agnostic: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrays(self, cls: str) -> dict[str, np.ndarray]:
        out = {f"{cls}/labels": self.labels} | {f"{cls}/{s}": v for s, v in self.scores.items()}
        if self.selected is not None:
            out[f"{cls}/selected"] = self.selected
        return out | {f"{cls}/agnostic/{s}": v for s, v in self.agnostic.items()}

    @staticmethod
    def from_arrays(
        arrays: dict[str, np.ndarray], cls: str, scores: list[str], path: Path
    ) -> ClassScores:
        """Class ``cls``'s record; the task-aware ``scores`` must all be present."""
        need = [f"{cls}/{s}" for s in ("labels", *scores)]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise CcnfError(f"{path} lacks {', '.join(missing[:3])}", where=str(path),
                            fix=recovery_fix(path))
        prefix = f"{cls}/agnostic/"
        return ClassScores(
            labels=arrays[f"{cls}/labels"],
            scores={s: arrays[f"{cls}/{s}"] for s in scores},
            selected=arrays.get(f"{cls}/selected"),
            agnostic={k.removeprefix(prefix): v for k, v in arrays.items()
                      if k.startswith(prefix)},
        )


@dataclass
class GalleryItem:
    """The k-th gallery image of a class: its path (root-relative), mask (S, S) bool and
    anomaly maps {score: (S, S)}."""

    cls: str
    index: int
    name: str
    mask: np.ndarray
    maps: dict[str, np.ndarray]

    def to_arrays(self) -> dict[str, np.ndarray]:
        key = f"{self.cls}/{self.index}"
        return {f"{key}/name": np.array(self.name), f"{key}/mask": self.mask} | {
            f"{key}/{s}": m for s, m in self.maps.items()
        }

    @staticmethod
    def read_all(
        arrays: dict[str, np.ndarray], classes: list[str], need: list[str], path: Path
    ) -> list[GalleryItem]:
        """Every item of ``classes`` in class then index order; each must hold the
        ``need`` maps."""
        items = []
        for cls in classes:
            k = 0
            while f"{cls}/{k}/name" in arrays:
                key = f"{cls}/{k}/"
                missing = [key + part for part in ("mask", *need) if key + part not in arrays]
                if missing:
                    raise CcnfError(f"{path} lacks {', '.join(missing[:3])}", where=str(path),
                                    fix=recovery_fix(path))
                maps = {name.removeprefix(key): v for name, v in arrays.items()
                        if name.startswith(key) and name[len(key):] not in ("name", "mask")}
                items.append(GalleryItem(cls, k, str(arrays[key + "name"]),
                                         arrays[key + "mask"], maps))
                k += 1
        return items
