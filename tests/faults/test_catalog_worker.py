"""A catalog run whose DVC queue worker dies: failures reported by id, a re-run finishes the rest.

Real DVC (``dvc exp run --queue`` + ``dvc queue start``) on a stand-in pipeline: one stage that
writes metrics from params.yaml, as in tests/test_catalog.py. The second experiment the
worker runs kills that worker with SIGKILL (as the OOM killer or a crash would), from inside
its stage; nothing is simulated on the ccnf side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ccnf.catalog as catalog
from ccnf.cli import app

REPO = Path(__file__).resolve().parents[2]

# the second run of this stage (counted in $CCNF_FAULT_COUNTER) SIGKILLs its queue worker
STAND_IN = """\
import hashlib, json, os, signal, yaml
import psutil
p = yaml.safe_load(open("params.yaml"))
h = int(hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:6], 16) / 16**6
counter = os.environ.get("CCNF_FAULT_COUNTER")
if counter:
    n = int(open(counter).read() or 0) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(n))
    if n == 2:
        for proc in psutil.Process().parents():
            if "queue-worker" in " ".join(proc.cmdline()):
                proc.kill()
        os.kill(os.getpid(), signal.SIGKILL)
m = {s: {"image_auroc": round(h, 6), "pixel_auroc": 0.7, "aupro": 0.4, "image_forgetting": 0.1,
         "pixel_forgetting": 0.05} for s in ("nf", "proto", "hybrid")}
os.makedirs("metrics", exist_ok=True)
json.dump(m, open("metrics/summary.json", "w"))
"""

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps:
    - train.py
    params:
    - loss
    - train
    outs:
    - metrics/summary.json:
        cache: false
metrics:
- metrics/summary.json
"""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def _run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    shutil.copy(REPO / "catalog.yaml", work / "catalog.yaml")
    (work / "train.py").write_text(STAND_IN)
    (work / "dvc.yaml").write_text(DVC_YAML)
    _run("git", "init", "-q", cwd=work)
    _run("git", "config", "user.name", "t", cwd=work)
    _run("git", "config", "user.email", "t@t", cwd=work)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=work)
    _run(sys.executable, "-m", "dvc", "repro", "-q", cwd=work)
    _run("git", "add", "-A", cwd=work)
    _run("git", "commit", "-qm", "base", cwd=work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(catalog.runner, "POLL_S", 0.5)  # the stand-in stage takes about a second
    return work


def _experiments(cwd: Path) -> set[str]:
    out = _run(sys.executable, "-m", "dvc", "exp", "list", "--name-only", cwd=cwd)
    return set(out.split())


def test_dead_queue_worker_is_reported_by_id_and_a_rerun_finishes_the_rest(
    repo: Path, tmp_path: Path, monkeypatch, faults
) -> None:
    counter = tmp_path / "runs"
    monkeypatch.setenv("CCNF_FAULT_COUNTER", str(counter))
    ids = ["E0", "E4", "E6"]
    runner = CliRunner()
    first = runner.invoke(app, ["catalog", "run", *ids, "--mode", "queue", "--jobs", "1"])
    faults.inject("queue worker killed")
    # the run ends (it used to wait for ever) and names what failed and why
    assert first.exit_code == 1, first.output
    assert int(counter.read_text()) == 2
    done = _experiments(repo)
    assert len(done & set(ids)) == 1, (done, first.output)
    (finished,) = done & set(ids)
    unfinished = [i for i in ids if i != finished]
    assert "no queue worker is alive any more" in first.output
    assert f"2 experiment(s) failed: {', '.join(unfinished)}" in first.output
    assert "its queue worker died while it ran" in first.output
    assert "never started: no queue worker was left to run it" in first.output
    assert "run the same command again" in first.output
    assert "Traceback" not in first.output
    # the queue holds nothing stuck any more
    assert not {n for n in catalog.queued_names(repo) if n in unfinished}

    # the same command again: the finished experiment is kept, the other two run
    monkeypatch.delenv("CCNF_FAULT_COUNTER")
    second = runner.invoke(app, ["catalog", "run", *ids, "--mode", "queue", "--jobs", "1",
                                 "--timing", "timing.json"])
    assert second.exit_code == 0, second.output
    assert f"kept: {finished}" in second.output
    timing = json.loads((repo / "timing.json").read_text())
    assert timing["kept_finished"] == [finished]
    assert sorted(timing["experiments"]) == sorted(unfinished)
    assert all(v["ok"] for v in timing["experiments"].values())
    assert faults.check(_experiments(repo) >= set(ids), "catalog experiments after re-run")


def test_worker_status_line_is_parsed() -> None:
    out = """Task     Name    Created    Status
fd469e5  E6      09:08 AM   Running
3114844  E7      Nov 02 09:08   Queued
fd469e5  E6      09:08 AM   Success

Worker status: 0 active, 1 idle
"""
    st = catalog.parse_queue_status(out)
    assert st.entries == {"E6": "Success", "E7": "Queued"}  # a finished entry's last row wins
    assert st.workers == 1
    assert catalog.parse_queue_status("Task Name Created Status\n").workers is None
