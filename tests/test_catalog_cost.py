"""The catalog's step count against the steps training really takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_mvtec_root, tiny_params

from ccnf.catalog.cost import experiment_steps, min_hours, min_steps
from ccnf.catalog.schema import Experiment
from ccnf.config import parse_params
from ccnf.data.manifest import index_root
from ccnf.errors import CcnfError
from ccnf.features import extract_features
from ccnf.train import init_model, train_task


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("cost")
    root = make_mvtec_root(tmp / "ds", ["a", "b", "c"], n_train=6)
    raw = tiny_params(root, [["a", "b"], ["c"]])
    # three passes of 4 images per step: the epochs decide a two-class task (3 x 3 = 9 steps
    # against a floor of 2 x 3), the floor a one-class task (3 x 1 against 4)
    raw["train"].update(epochs=3, min_steps_per_class=4)
    params = parse_params(raw)
    manifest = index_root(root, params.classes, progress=False)
    manifest.save(tmp / "manifest.json")
    extract_features(manifest, params, tmp / "features")
    return tmp, raw


def _trained_steps(tmp: Path, raw: dict, name: str) -> int:
    """Optimizer steps of a whole run (every task), counted from the training logs."""
    params = parse_params(raw)
    init_model(params, tmp / "features", tmp / name / "init")
    prev, steps = tmp / name / "init", 0
    for task in params.task_names:
        out = tmp / name / task
        train_task(params, task, tmp / "features", prev, out)
        steps += len((out / "train_log.tsv").read_text().splitlines()) - 1
        prev = out
    return steps


def _with(raw: dict, **sections: dict) -> dict:
    return {**raw, **{k: {**raw[k], **v} for k, v in sections.items()}}


BANK = {"score": {"class_select": "likelihood"}}
EXACT = {
    "naive": {},
    "joint": {"train": {"strategy": "joint"}},
    "meta_epochs": {"train": {"meta_epochs": 2}},
    "adapters": {"train": {"strategy": "adapters"}},
    "flow_bank": {"model": {"kind": "flow_bank"}, **BANK},
    "fastflow": {"model": {"kind": "fastflow"}, **BANK},
    "gaussian": {"model": {"kind": "gaussian"}, **BANK},
}


@pytest.mark.parametrize("name", list(EXACT))
def test_the_count_is_the_steps_training_takes(prepared, name: str) -> None:
    tmp, raw = prepared
    var = _with(raw, **EXACT[name])
    counted = min_steps(parse_params(var), tmp / "manifest.json")
    assert counted == _trained_steps(tmp, var, name)
    assert (counted == 0) == (name == "gaussian")


def test_the_count_is_a_lower_bound_where_replayed_images_add_steps(prepared) -> None:
    tmp, raw = prepared
    var = _with(raw, train={"strategy": "replay", "replay_buffer": 4, "min_steps_per_class": 0})
    counted = min_steps(parse_params(var), tmp / "manifest.json")
    trained = _trained_steps(tmp, var, "replay")
    assert 0 < counted < trained  # the buffer's images lengthen task 1's epochs


def test_synthetic_data_needs_no_manifest_and_a_data_set_on_disk_does(prepared,
                                                                     raw_params) -> None:
    _, raw = prepared
    # the default study: 5 tasks of 3 classes, 48 fit images each: the floor of 200 steps
    # per class decides every task
    assert min_steps(parse_params(raw_params)) == 5 * 3 * 200
    with pytest.raises(CcnfError, match="manifest"):
        min_steps(parse_params(raw))


def test_experiments_are_counted_with_their_protocol_and_overrides(raw_params) -> None:
    rows = experiment_steps(
        [Experiment("a", "", ("train.min_steps_per_class=100",)),
         Experiment("b", "", ("model.kind=gaussian", "score.class_select=likelihood"))],
        raw_params)
    assert [(r.id, r.kind, r.steps) for r in rows] == [("a", "ccnf", 1500), ("b", "gaussian", 0)]


def test_the_time_bound_is_steps_times_step_time_over_workers() -> None:
    assert min_hours(360_000, 20.0, 2) == pytest.approx(1.0)
    with pytest.raises(CcnfError, match="workers"):
        min_hours(1, 20.0, 0)


def test_the_command_prints_the_totals_and_the_step_time_the_budget_allows() -> None:
    from conftest import REPO
    from typer.testing import CliRunner

    from ccnf.cli import app

    args = ["catalog", "cost", "E11", "B-gaussian", "--catalog", str(REPO / "catalog.yaml"),
            "--params", str(REPO / "params.yaml"), "--minutes", "1", "--step-ms", "36"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    # E11 is the default study (3,000 steps), the Gaussian trains none: 1 minute of 2 workers
    # allows 2 x 60,000 / 3,000 = 40 ms a step, and 3,000 steps of 36 ms take 54 s
    assert "3,000" in res.output and "40.0 ms" in res.output
    assert "at least 0.9 minutes" in res.output and "does not fit" not in res.output
