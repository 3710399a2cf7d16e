"""The leaky test-selected figure (eval.test_selected): opt-in, labelled, never the headline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_mvtec_root, tiny_params

from ccnf.aggregate import aggregate
from ccnf.config import parse_params
from ccnf.data.manifest import index_root
from ccnf.evaluate import evaluate_task
from ccnf.features import extract_features
from ccnf.models import read_checkpoint
from ccnf.train import init_model, snapshot_steps, train_task


def _study(root: Path, raw: dict) -> dict:
    """Train and evaluate every task of ``raw`` under root; returns summary.json."""
    params = parse_params(raw)
    prev = root.parent / "models" / "init"
    for task in params.task_names:
        train_task(params, task, root.parent / "features", prev, root / "models" / task)
        prev = root / "models" / task
        evaluate_task(params, task, root.parent / "features", prev,
                      root / "metrics/tasks" / f"{task}.json", root / "eval" / task)
    aggregate(params, root / "metrics", root / "models", root / "eval", root / "plots")
    return json.loads((root / "metrics/summary.json").read_text())


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("leaky")
    root = make_mvtec_root(tmp / "ds", ["a", "b", "c"], n_train=5)
    raw = tiny_params(root, [["a", "b"], ["c"]])
    raw["eval"].update(gallery_per_class=0, workers=1)
    raw["train"].update(min_steps_per_class=3)  # task 1: 3 steps, so 2 snapshots
    params = parse_params(raw)
    extract_features(index_root(root, params.classes, progress=False), params, tmp / "features")
    init_model(params, tmp / "features", tmp / "models" / "init")
    plain = _study(tmp / "plain", raw)
    leaky_raw = {**raw, "eval": {**raw["eval"], "test_selected": 3}}
    leaky = _study(tmp / "leaky", leaky_raw)
    return tmp, plain, leaky


def test_snapshot_steps_are_evenly_spaced_and_exclude_the_final_model() -> None:
    assert snapshot_steps(600, 4) == {150, 300, 450}
    assert snapshot_steps(10, 1) == set()
    assert snapshot_steps(2, 5) == {1}


def test_test_selected_is_opt_in_labelled_and_never_the_headline(studies) -> None:
    tmp, plain, leaky = studies
    assert "test_selected_leaky" not in plain
    block = leaky["test_selected_leaky"]
    assert block["leaky"] is True and block["selected_on"] == "test set"
    # the headline figures are the final models', with or without the leaky block
    headline = {k: v for k, v in leaky.items() if k != "test_selected_leaky"}
    assert headline == plain
    # the selection took the best candidate, the final model among them
    last = json.loads((tmp / "leaky/metrics/tasks/t1.json").read_text())["test_selected_leaky"]
    names = [c["model"] for c in last["candidates"]]
    assert names[-1] == "final" and len(names) == 3
    assert block["image_auroc"] == max(c["image_auroc"] for c in last["candidates"])
    final = last["candidates"][-1]
    assert final["image_auroc"] == pytest.approx(plain["nf"]["image_auroc"], abs=1e-6)
    assert block["image_auroc"] >= plain["nf"]["image_auroc"]


def test_snapshots_are_checkpoints_of_the_task_with_their_own_calibration(studies) -> None:
    tmp, _, _ = studies
    snaps = sorted((tmp / "leaky/models/t1/snapshots").iterdir())
    assert len(snaps) == 2
    final = read_checkpoint(tmp / "leaky/models/t1")
    for snap in snaps:
        ckpt = read_checkpoint(snap)
        assert ckpt["classes"] == final["classes"] and ckpt["task"] == 1
        assert set(ckpt["calibration"]) == {"a", "b", "c"}
        assert not (ckpt["calibration"]["c"]["nf"][0] == final["calibration"]["c"]["nf"][0]).all()
    assert not (tmp / "plain/models/t1/snapshots").exists()


def test_ccnf_info_labels_the_leaky_figure_and_shows_memory(studies) -> None:
    from typer.testing import CliRunner

    from ccnf.cli import app

    tmp, _, leaky = studies
    for name, has_leaky in (("leaky", True), ("plain", False)):
        out = CliRunner().invoke(app, ["info", "--metrics", str(tmp / name / "metrics"),
                                       "--params", str(tmp / "none.yaml")], env={"COLUMNS": "200"})
        assert out.exit_code == 0, out.output
        assert ("LEAKY" in out.output) == has_leaky
        assert "memory: the final model keeps" in out.output
    block = leaky["test_selected_leaky"]
    assert f"{block['image_auroc']:.4f}" in CliRunner().invoke(
        app, ["info", "--metrics", str(tmp / "leaky/metrics"), "--params",
              str(tmp / "none.yaml")], env={"COLUMNS": "200"}).output
