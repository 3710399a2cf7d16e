"""End to end through DVC on a tiny dataset: the real dvc.yaml, stage scripts and library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_mvtec_root, run_stages_here, tiny_params
from typer.testing import CliRunner

from ccnf.cli import app

VENV_BIN = str(Path(sys.executable).parent)


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"],
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, check)


def _ccnf(work: Path, *args: str) -> str:
    """``ccnf ARGS`` as a subprocess in ``work``; its stdout and stderr."""
    proc = _run([sys.executable, "-m", "ccnf.cli", *args], work)
    return proc.stdout + proc.stderr


def build_study(work: Path) -> Path:
    """A copy of the project in ``work`` with tiny params, after one full `dvc repro`."""
    for item in ("ccnf", "stages", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / item)
    make_mvtec_root(work / "external" / "ds", ["a", "b", "c", "d"], n_train=5)
    # relative to the study: a copy of it (shutil.copytree) then reads its own images and
    # needs neither prepare nor extract again
    raw = tiny_params(Path("external/ds"), [["a", "b"], ["c", "d"]])
    raw["data"]["synthetic"].update(image_size=64, n_train=4, n_test_good=1, n_test_defect=2)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], work)
    _dvc("init", "-q", cwd=work)
    _dvc("repro", cwd=work)
    return work


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("study"))


def _stale(work: Path) -> set[str]:
    """Stages `dvc repro` would run now (downstream ones included)."""
    out = _dvc("repro", "--dry", cwd=work).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


def test_repro_writes_metrics_and_plots(study: Path) -> None:
    summary = json.loads((study / "metrics/summary.json").read_text())
    for score in ("nf", "proto", "hybrid"):
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_forgetting",
                    "pixel_forgetting"):
            assert 0.0 <= abs(summary[score][key]) <= 1.0, (score, key)
    for png in ("task_curves", "R_image_auroc", "loss_curves", "roc_nf", "gallery"):
        assert (study / "plots" / f"{png}.png").stat().st_size > 1000
    assert (study / "plots/loss.tsv").read_text().startswith("step\t")
    assert _stale(study) == set()


def test_dag_chains_tasks_through_checkpoints(study: Path) -> None:
    dot = _dvc("dag", "--dot", cwd=study).stdout
    edges = {
        tuple(part.strip().strip('"') for part in line.strip().rstrip(";").split("->"))
        for line in dot.splitlines()
        if "->" in line
    }
    assert ("init", "train@t0") in edges
    assert ("train@t0", "train@t1") in edges
    assert ("train@t1", "evaluate@t1") in edges
    assert ("extract", "train@t0") in edges
    assert ("train@t1", "train@t0") not in edges


def test_changing_an_image_on_disk_reruns_prepare(study: Path) -> None:
    image = study / "external/ds/a/train/good/000.png"
    original = image.read_bytes()
    try:
        from PIL import Image

        Image.new("RGB", (48, 48), (1, 2, 3)).save(image)
        assert "prepare" in _stale(study)
    finally:
        image.write_bytes(original)


def test_bad_params_key_fails_the_stage_with_one_clear_message(study: Path, tmp_path) -> None:
    raw = yaml.safe_load((study / "params.yaml").read_text())
    raw["loss"]["lambda_centre"] = raw["loss"].pop("lambda_center")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = _run([sys.executable, "stages/prepare.py", "--params", str(bad)], study, check=False)
    assert proc.returncode == 1
    assert "unknown key 'loss.lambda_centre'" in proc.stderr
    assert "did you mean 'loss.lambda_center'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_root_fails_prepare_cleanly(study: Path, tmp_path) -> None:
    raw = yaml.safe_load((study / "params.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "no_such_dataset")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = tmp_path / "manifest.json"
    proc = _run([sys.executable, "stages/prepare.py", "--params", str(bad), "--out", str(out)],
                study, check=False)
    assert proc.returncode == 1 and "data.root does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_info_prints_the_run(study: Path) -> None:
    proc = _run([sys.executable, "-m", "ccnf.cli", "info"], study)
    assert "final averages" in proc.stderr + proc.stdout


def test_cli_score_one_image(study: Path, tmp_path: Path) -> None:
    image = study / "external/ds/c/test/hole/000.png"
    out = tmp_path / "map.png"
    proc = _run([sys.executable, "-m", "ccnf.cli", "score", str(image), "--cls", "c",
                 "--out", str(out)], study)
    text = proc.stdout + proc.stderr
    assert "hybrid" in text and out.stat().st_size > 1000
    bad = _run([sys.executable, "-m", "ccnf.cli", "score", str(image), "--cls", "zz"], study,
               check=False)
    assert bad.returncode == 1 and "class 'zz' is not known" in bad.stderr


def test_editing_the_optimizer_marks_the_train_stages_changed(study: Path) -> None:
    """Issue 11: code deps cannot go stale (ccnf/optim.py was once missing from train)."""
    optim = study / "ccnf/optim.py"
    original = optim.read_text()
    try:
        optim.write_text(original + "\n# a trivial edit\n")
        status = _dvc("status", cwd=study).stdout
        assert "train@t0" in status and "train@t1" in status
        assert {"train@t0", "train@t1", "evaluate@t0"} <= _stale(study)
        assert not {"prepare", "extract"} & _stale(study)
    finally:
        optim.write_text(original)
    assert _stale(study) == set()


def _add_toy_model(work: Path) -> None:
    """What adding a model kind takes: one module and one registry line."""
    shutil.copy(REPO / "tests/toy_model.py", work / "ccnf/models/toy.py")
    registry = work / "ccnf/models/registry.py"
    text = registry.read_text()
    anchor = "MODELS: dict[str, str] = {\n"
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + '    "toy": "ccnf.models.toy:ToyModel",\n'))


def _cli(work: Path, *args: str, in_process: bool) -> str:
    """``ccnf ARGS`` run in ``work`` (the current directory when ``in_process``); its output."""
    if in_process:
        assert Path.cwd() == work
        res = CliRunner().invoke(app, list(args))
        assert res.exit_code == 0, res.output
        return res.output
    return _ccnf(work, *args)


@pytest.mark.parametrize("kind", ["gaussian", "flow_bank", "fastflow", "toy"])
def test_every_model_kind_runs_the_pipeline_and_the_cli(
    study: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init/train/evaluate/aggregate, then ccnf info, score and report, for each kind; the
    pipeline never asks which kind it holds (DESIGN.md section 9). The toy kind exists only in
    the copy (one module, one registry line) and goes through `dvc repro` and the CLI as
    subprocesses; the built-in kinds run the same stage scripts and CLI in this process."""
    work = tmp_path / kind
    shutil.copytree(study, work, symlinks=True)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["model"]["kind"] = kind
    raw["score"]["class_select"] = "likelihood"
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    in_process = kind != "toy"
    if in_process:
        monkeypatch.chdir(work)
        ran = run_stages_here(work)
    else:
        _add_toy_model(work)
        ran = set(re.findall(r"Running stage '([^']+)'", _dvc("repro", cwd=work).stdout))
    assert {"init", "train@t1", "evaluate@t1", "aggregate"} <= ran
    assert not {"prepare", "extract"} & ran  # only the model's stages depend on model.kind
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert set(summary) >= {"nf", "latent"} and "proto" not in summary
    assert 0.0 <= summary["nf"]["image_auroc"] <= 1.0
    assert "final averages" in _cli(work, "info", in_process=in_process)
    image = work / "external/ds/c/test/hole/000.png"
    scored = _cli(work, "score", str(image), "--cls", "c", "--out", str(tmp_path / "map.png"),
                  in_process=in_process)
    assert "latent" in scored and "hybrid" not in scored
    assert (tmp_path / "map.png").stat().st_size > 1000
    readme = work / "README.md"
    readme.write_text("# study\n<!-- results:begin -->\n<!-- results:end -->\n")
    _cli(work, "report", "readme", in_process=in_process)
    assert "nf" in readme.read_text().split("begin")[1]


def test_exp_run_loss_change_reruns_training_but_not_extraction(study: Path) -> None:
    """Issue 2, must-show 2 (runs last: it leaves the experiment's results in the workspace)."""
    _run(["git", "add", "-A"], study)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"], study)
    _run(["git", "config", "user.name", "t"], study)
    _run(["git", "config", "user.email", "t@t"], study)
    out = _dvc("exp", "run", "-S", "loss.lambda_center=0.1", cwd=study).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {"train@t0", "train@t1", "evaluate@t0", "evaluate@t1", "aggregate"} <= ran
    assert not {"synth", "prepare", "extract", "init"} & ran
    diff = json.loads(_dvc("metrics", "diff", "--json", cwd=study).stdout)
    changed = diff["metrics/summary.json"]
    assert any(abs(v.get("diff") or 0) > 0 for v in changed.values())  # told apart from E0
    raw = yaml.safe_load((study / "params.yaml").read_text())
    raw["backbone"]["batch_size"] = 3
    (study / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "extract" in _stale(study)

