"""What a catalog costs at the least: its optimizer steps, and the time they take.

For an experiment with params p the train stages hand the model, task by task, each new
class's fit images: its training split less the calibration slice
(:func:`ccnf.train.calibration_split`), every class at task 0 under ``joint``
(:func:`ccnf.train.task_classes`). The model kind states how many optimizer steps learning
them takes (:meth:`ccnf.models.base.AnomalyModel.min_training_steps`: exact where a task
trains on its own images, a lower bound where a strategy adds replayed or generated ones).
With one step taking s seconds on a worker, W workers need at least

    T >= s * sum_e steps(e) / W

for the catalog's training alone; evaluation, stage start-up and DVC's own work come on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccnf.catalog.schema import Experiment
from ccnf.config import Params, parse_params
from ccnf.data.manifest import Manifest
from ccnf.errors import CcnfError
from ccnf.models.registry import check_params


@dataclass(frozen=True)
class ExperimentSteps:
    """One experiment's fewest optimizer steps, with what decides them."""

    id: str
    kind: str
    strategy: str
    steps: int


def train_images(params: Params, manifest: Path | None = None) -> dict[str, int]:
    """{class: training images} of the params' data: the synthetic generator's
    ``data.synthetic.n_train``, or the prepared manifest's count for a data set on disk."""
    if params.data.source == "synthetic":
        return dict.fromkeys(params.classes, params.data.synthetic.n_train)
    if manifest is None:
        raise CcnfError(
            f"data.source '{params.data.source}': the training images per class come from "
            "the prepared manifest, and none was given",
            where="params.yaml: data.source",
            fix="run `dvc repro prepare` and pass data/manifest.json",
        )
    found = Manifest.load(manifest)
    counts = {c: len(found.select(c, "train")) for c in params.classes}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise CcnfError(f"the manifest holds no training image of {', '.join(missing)}",
                        where=str(manifest), fix="run `dvc repro prepare` for these params")
    return counts


def fit_images(params: Params, images: dict[str, int]) -> list[dict[str, int]]:
    """Per task, {class: fit images} as the train stage hands them to the model."""
    from ccnf.train import calibration_split, task_classes

    tasks = []
    for t in range(len(params.split)):
        new, _ = task_classes(params, t)
        tasks.append({
            c: len(calibration_split(images[c], params.eval.calib_fraction, params.seed)[0])
            for c in new
        })
    return tasks


def experiment_steps(
    experiments: Sequence[Experiment], base: dict[str, Any], manifest: Path | None = None
) -> list[ExperimentSteps]:
    """The fewest optimizer steps of each experiment (its protocol and overrides applied to
    ``base``, the raw params.yaml mapping)."""
    out = []
    for exp in experiments:
        params = parse_params(exp.expected_params(base), f"catalog experiment '{exp.id}'")
        out.append(ExperimentSteps(exp.id, params.model.kind, params.train.strategy,
                                   min_steps(params, manifest)))
    return out


def min_steps(params: Params, manifest: Path | None = None) -> int:
    """The fewest optimizer steps of a whole run of ``params`` (every task)."""
    tasks = fit_images(params, train_images(params, manifest))
    return check_params(params).min_training_steps(params, tasks)


def min_hours(total_steps: int, step_ms: float, workers: int) -> float:
    """T = step_ms * total_steps / workers, in hours (the bound of the module docstring)."""
    if workers < 1 or step_ms <= 0:
        raise CcnfError(f"need workers >= 1 and a positive step time, got {workers} and "
                        f"{step_ms} ms", fix="pass --workers N and --step-ms MS")
    return step_ms * total_steps / workers / 3.6e6
