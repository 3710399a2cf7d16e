"""Every model kind through the real pipeline and CLI (DESIGN.md section 9: the pipeline never
asks which kind it holds). Apart from tests/test_pipeline.py so the two can run in parallel."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_pipeline import _dvc, _run, build_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("study_kinds"))


def _add_toy_model(work: Path) -> None:
    """What adding a model kind takes: one module and one registry line."""
    shutil.copy(REPO / "tests/toy_model.py", work / "ccnf/models/toy.py")
    registry = work / "ccnf/models/registry.py"
    text = registry.read_text()
    anchor = "MODELS: dict[str, str] = {\n"
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + '    "toy": "ccnf.models.toy:ToyModel",\n'))


@pytest.mark.parametrize("kind", ["gaussian", "flow_bank", "fastflow", "toy"])
def test_every_model_kind_runs_the_pipeline_and_the_cli(
    study: Path, tmp_path: Path, kind: str
) -> None:
    """init/train/evaluate/aggregate, then ccnf info, score and report, for each kind; the
    pipeline never asks which kind it holds (the toy kind exists only in this copy)."""
    work = tmp_path / kind
    shutil.copytree(study, work, symlinks=True)
    if kind == "toy":
        _add_toy_model(work)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["model"]["kind"] = kind
    raw["score"]["class_select"] = "likelihood"
    # the copy's own images (a path outside the repository is hashed as an external dep)
    raw["data"]["root"] = "external/ds"
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ran = set(re.findall(r"Running stage '([^']+)'", _dvc("repro", cwd=work).stdout))
    assert {"init", "train@t1", "evaluate@t1", "aggregate"} <= ran
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert set(summary) >= {"nf", "latent"} and "proto" not in summary
    assert 0.0 <= summary["nf"]["image_auroc"] <= 1.0
    info = _run([sys.executable, "-m", "ccnf.cli", "info"], work)
    assert "final averages" in info.stdout + info.stderr
    image = work / "external/ds/c/test/hole/000.png"
    scored = _run([sys.executable, "-m", "ccnf.cli", "score", str(image), "--cls", "c",
                   "--out", str(tmp_path / "map.png")], work)
    assert "latent" in scored.stdout + scored.stderr and "hybrid" not in scored.stdout
    assert (tmp_path / "map.png").stat().st_size > 1000
    readme = work / "README.md"
    readme.write_text("# study\n<!-- results:begin -->\n<!-- results:end -->\n")
    _run([sys.executable, "-m", "ccnf.cli", "report", "readme"], work)
    assert "| nf |" in readme.read_text() or "nf" in readme.read_text().split("begin")[1]
