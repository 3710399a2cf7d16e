"""One class seen: the task-agnostic block needs no class-selection pass (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluate import build_study, run

import ccnf.models.ccnf as ccnf_model_module
from ccnf.names import SCORES


def _no_selection_pass(*args: object, **kwargs: object) -> None:
    raise AssertionError("a class-selection pass ran although one class has been seen")


@pytest.mark.parametrize("method", ["prototype", "likelihood"])
def test_one_seen_class_skips_the_selection_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    params = build_study(
        tmp_path, {"eval": {"workers": 1}, "score": {"class_select": method}}, task_split=[["a"]]
    )
    monkeypatch.setattr(ccnf_model_module, "class_statistics", _no_selection_pass)
    res = run(tmp_path, params, task="t0")
    agn = res["agnostic"]
    assert agn["class_select"] == method and agn["same_as_aware"] is False
    assert agn["selection_accuracy"] == 1.0
    assert agn["selection_accuracy_by_method"] == {"likelihood": 1.0, "prototype": 1.0}
    entry = agn["per_class"]["a"]
    assert entry["selected"] == {"a": 6}
    for score in SCORES:  # what a pass would have found: the task-aware scores
        assert entry[score] == res["per_class"]["a"][score]
        assert agn["per_task"]["t0"][score] == res["per_task"]["t0"][score]


def test_two_seen_classes_still_run_the_pass(tmp_path: Path, monkeypatch) -> None:
    """The check above can fail: with two classes the (forbidden) pass is reached."""
    params = build_study(tmp_path, {"eval": {"workers": 1}}, task_split=[["a", "b"]])
    monkeypatch.setattr(ccnf_model_module, "class_statistics", _no_selection_pass)
    with pytest.raises(AssertionError, match="class-selection pass ran"):
        run(tmp_path, params, task="t0")
