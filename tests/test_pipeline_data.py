"""Issue 14 end to end: your own data through `ccnf data use` and DVC, on generated folders.

Each study is a fresh copy of the project (code, dvc.yaml, the repository's params.yaml), made
tiny for speed the way tests/test_pipeline.py does (small images, a small flow, one epoch);
then ONE command points it at the data and `dvc repro` runs it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_mvtec_root, run_stages_here, shrink
from test_pipeline import _ccnf, _dvc, _run

# industrial12's class names (../shared/realdata/industrial12); the images are generated
INDUSTRIAL12 = [
    "cookie", "magnetic_tile", "pcb_00041", "pcb_12100", "pcb_12300", "pcb_13000",
    "pcb_20085", "pcb_44000", "pcb_50600", "pcb_77000", "pcb_90100", "pcb_92000",
]


def _project(work: Path) -> Path:
    """A fresh copy of the project with the repository's params, sized down for a test."""
    for item in ("ccnf", "stages", "dvc.yaml", "params.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / item)
    raw = shrink(yaml.safe_load((work / "params.yaml").read_text()))  # data keys kept
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], work)
    _dvc("init", "-q", cwd=work)
    return work


def _planned(work: Path) -> set[str]:
    """Stages `dvc repro` would run (it runs every stage of the DAG)."""
    return set(re.findall(r"Running stage '([^']+)'", _dvc("repro", "--dry", cwd=work).stdout))


def _dag(work: Path) -> set[str]:
    """Every stage of the pipeline's DAG (what `dvc repro` runs when they are all stale)."""
    dot = _dvc("dag", "--dot", cwd=work).stdout
    return set(re.findall(r'^"([^"]+)";$', dot, flags=re.MULTILINE))


def test_one_custom_class_in_one_task_and_synth_only_for_synthetic(tmp_path: Path) -> None:
    """One class of your own in one task: no synth stage, no class-selection pass."""
    work = _project(tmp_path / "study")
    assert {"synth@synthetic", "prepare"} <= _dag(work)  # the repository's params: synthetic
    root = make_mvtec_root(tmp_path / "data" / "magnetic_tile", ["magnetic_tile"], n_train=5)
    text = _ccnf(work, "data", "use", "folder", "--root", str(root), "--protocol", "all-in-one")
    assert "into 1 task(s)" in text
    stages = {"prepare", "extract", "init", "train@t0", "evaluate@t0", "aggregate"}
    assert _dag(work) == stages  # synth is not in the DAG, so dvc repro cannot run it
    out = _dvc("repro", cwd=work).stdout
    assert set(re.findall(r"Running stage '([^']+)'", out)) == stages
    assert not (work / "data" / "synthetic").exists()
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert summary["class_select"]["accuracy"] == 1.0  # one class: nothing to select
    t0 = json.loads((work / "metrics/tasks/t0.json").read_text())
    assert t0["agnostic"]["per_class"]["magnetic_tile"]["selected"] == {"magnetic_tile": 4}
    _ccnf(work, "data", "use", "synthetic", "--protocol", "15x1")  # and back: synth returns
    assert {"synth@synthetic", "train@t14"} <= _dag(work)


@pytest.fixture(scope="module")
def industrial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """industrial12 in five tasks: `ccnf data use ...`, DVC runs prepare and extract, the
    model's stages run in this process (as `dvc repro` would run them: tests/test_pipeline.py
    shows that it does) and `dvc commit` records them."""
    base = tmp_path_factory.mktemp("industrial12")
    root = make_mvtec_root(base / "data" / "industrial12", INDUSTRIAL12, n_train=5, n_good=2,
                           n_bad=2, size=40)
    work = _project(base / "study")
    _ccnf(work, "data", "use", "folder", "--root", str(root), "--protocol", "3-3-2-2-2")
    _dvc("repro", "extract", cwd=work)
    assert {"init", "train@t4", "evaluate@t4", "aggregate"} <= run_stages_here(work)
    _dvc("commit", "--force", cwd=work)
    return work


def test_industrial12_runs_in_five_tasks(industrial: Path) -> None:
    matrices = json.loads((industrial / "metrics/matrices.json").read_text())
    r = matrices["nf"]["image_auroc"]
    assert len(r) == 5 and all(len(row) == 5 for row in r)
    per_class = json.loads((industrial / "metrics/per_class.json").read_text())
    assert sorted(per_class) == INDUSTRIAL12
    assert [per_class[c]["task"] for c in INDUSTRIAL12] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    summary = json.loads((industrial / "metrics/summary.json").read_text())
    assert 0.0 <= summary["nf"]["image_auroc"] <= 1.0
    assert not (industrial / "data" / "synthetic").exists()  # nothing generated
    assert _planned(industrial) == set()  # up to date


def test_switching_the_protocol_reuses_prepared_data_and_features(industrial: Path) -> None:
    text = _ccnf(industrial, "data", "use", "--protocol", "11-1")
    assert "into 2 task(s)" in text
    planned = _planned(industrial)
    assert not {"prepare", "extract", "init"} & planned
    assert {"train@t0", "train@t1", "evaluate@t1", "aggregate"} <= planned
