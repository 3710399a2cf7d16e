"""`ccnf data use`: one command rewrites data.* and the task chain, comments kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_mvtec_root, make_visa_root
from typer.testing import CliRunner

from ccnf.cli import app
from ccnf.config import load_params
from ccnf.data.use import choose, overrides, rewrite_params
from ccnf.errors import CcnfError

INDUSTRIAL = ["cookie", "magnetic_tile", *(f"pcb_{i:05d}" for i in range(10))]


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    target = tmp_path / "repo" / "params.yaml"
    target.parent.mkdir()
    shutil.copy(REPO / "params.yaml", target)
    return target


@pytest.fixture(scope="module")
def industrial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve class folders named like industrial12's, one image each is enough here."""
    return make_mvtec_root(
        tmp_path_factory.mktemp("ind") / "industrial12", INDUSTRIAL, n_train=2, n_good=1,
        n_bad=1, size=24,
    )


def _use(params_file: Path, **options) -> None:
    raw = yaml.safe_load(params_file.read_text())
    rewrite_params(params_file, choose(raw, base=params_file.parent, **options))


def _without(raw: dict, *keys: str) -> dict:
    return {k: v for k, v in raw.items() if k not in keys}


def test_industrial12_in_five_tasks(params_file: Path, industrial: Path) -> None:
    before = yaml.safe_load(params_file.read_text())
    _use(params_file, source="folder", root=str(industrial), protocol="3-3-2-2-2")
    p = load_params(params_file)
    assert (p.data.source, p.data.root, p.data.generate) == ("folder", str(industrial), [])
    assert p.data.classes == sorted(INDUSTRIAL)  # the folders, alphabetical
    assert [len(t) for t in p.split] == [3, 3, 2, 2, 2]
    assert p.split[0] == ["cookie", "magnetic_tile", "pcb_00000"]
    assert {n: t.prev for n, t in p.tasks.items()} == {
        "t0": "models/init", "t1": "models/t0", "t2": "models/t1", "t3": "models/t2",
        "t4": "models/t3"}
    after = yaml.safe_load(params_file.read_text())
    # nothing else moved: every other section is the same, key for key
    assert _without(after, "data", "tasks") == _without(before, "data", "tasks")
    assert _without(after["data"], *("source", "root", "classes", "protocol", "generate")) == \
        _without(before["data"], *("source", "root", "classes", "protocol", "generate"))


def test_comments_survive_and_the_way_back_restores_the_file(
    params_file: Path, industrial: Path
) -> None:
    original = params_file.read_text()
    _use(params_file, source="folder", root=str(industrial), protocol="one-per-task")
    text = params_file.read_text()
    comments = [line.split("#", 1)[1] for line in original.splitlines() if "#" in line]
    assert all(c in text for c in comments)
    assert len(load_params(params_file).task_names) == 12
    _use(params_file, source="synthetic", protocol="5x3", classes=None)
    assert params_file.read_text() == original


def test_protocol_only_keeps_the_data(params_file: Path, industrial: Path) -> None:
    _use(params_file, source="folder", root=str(industrial), protocol="4x3",
         classes=list(reversed(INDUSTRIAL)))
    _use(params_file, protocol="11-1")
    p = load_params(params_file)
    assert p.data.classes == list(reversed(INDUSTRIAL))  # the given order is kept
    assert p.split[-1] == ["cookie"] and len(p.task_names) == 2
    _use(params_file, source="folder", root=str(industrial), protocol="one-per-task")
    assert load_params(params_file).data.classes == sorted(INDUSTRIAL)  # a root: a fresh look


@pytest.mark.parametrize(
    "case",
    ["industrial-5-tasks", "one-class", "protocol-15x1", "visa", "mvtec-subset"],
)
def test_overrides_make_the_same_params_through_dvc(
    case: str, params_file: Path, industrial: Path, tmp_path: Path
) -> None:
    """`--overrides` prints dvc exp run -S flags; DVC's own -S code must give the rewrite."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    one = make_mvtec_root(tmp_path / "tiles", ["magnetic_tile"], n_train=2, n_good=1, n_bad=1,
                          size=24)
    visa = make_visa_root(tmp_path / "visa", ["candle", "pcb1"], n_train=2, n_good=1, n_bad=1,
                          size=24)
    mvtec = make_mvtec_root(tmp_path / "mvtec", ["bottle", "cable", "01"], n_train=2,
                            n_good=1, n_bad=1, size=24)
    options = {
        "industrial-5-tasks": {"source": "folder", "root": str(industrial),
                               "protocol": "3-3-2-2-2"},
        "one-class": {"source": "folder", "root": str(one), "protocol": "all-in-one"},
        "protocol-15x1": {"protocol": "15x1"},
        "visa": {"source": "visa", "root": str(visa), "classes": ["pcb1", "candle"],
                 "protocol": "one-per-task"},
        "mvtec-subset": {"source": "folder", "root": str(mvtec), "protocol": "1-2"},
    }[case]
    raw = yaml.safe_load(params_file.read_text())
    flags = overrides(raw, choose(raw, base=params_file.parent, **options))
    via_dvc = tmp_path / "dvc.yaml.params"
    shutil.copy(params_file, via_dvc)
    dvc_apply(via_dvc, flags)
    _use(params_file, **options)
    assert yaml.safe_load(via_dvc.read_text()) == yaml.safe_load(params_file.read_text())
    load_params(via_dvc)


def test_misfit_protocol_writes_nothing(params_file: Path, industrial: Path) -> None:
    before = params_file.read_text()
    with pytest.raises(CcnfError, match="5x3 -> 3-3-2-2-2"):
        _use(params_file, source="folder", root=str(industrial), protocol="5x3")
    assert params_file.read_text() == before


def test_bad_choices_are_clear(params_file: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(params_file.read_text())
    with pytest.raises(CcnfError, match="unknown data source 'mvtech' \\(did you mean 'mvtec'"):
        choose(raw, source="mvtech", root=str(tmp_path))
    with pytest.raises(CcnfError, match="needs the dataset's folder"):
        choose(raw, source="folder")
    with pytest.raises(CcnfError, match="does not exist"):
        choose(raw, source="folder", root=str(tmp_path / "nope"))
    with pytest.raises(CcnfError, match="no class folder"):
        choose(raw, source="folder", root=str(tmp_path))
    partial = make_mvtec_root(tmp_path / "mv", ["bottle", "cable"], n_train=2, n_good=1,
                              n_bad=1, size=24)
    with pytest.raises(CcnfError, match="13 of the mvtec classes are not under") as info:
        choose(raw, source="mvtec", root=str(partial))
    assert "--classes bottle,cable" in str(info.value)
    with pytest.raises(CcnfError, match="lives in data/synthetic"):
        choose(raw, source="synthetic", root=str(partial))


def test_cli_use_then_params_show_the_plan(
    params_file: Path, industrial: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    res = runner.invoke(app, ["data", "use", "folder", "--root", str(industrial),
                              "--protocol", "3-3-2-2-2", "--params", str(params_file)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["params", "--params", str(params_file)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # a long temporary path wraps the lines anywhere
    assert "folder under" in text and "protocol 3-3-2-2-2 into 5 task(s)" in text
    assert "(no synth: the images are on disk)" in text
    assert "pcb_00008, pcb_00009" in text
    res = runner.invoke(app, ["data", "use", "--protocol", "15x1", "--overrides",
                              "--params", str(params_file)])
    assert res.exit_code == 1 and "needs 15 classes" in res.output
