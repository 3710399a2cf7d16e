"""Faults injected into a real tiny study run by DVC (the repository's dvc.yaml and stages).

* ``kill -9`` of each stage kind in the middle of its work (a failpoint makes the stage
  process SIGKILL itself half-way through writing a file, or with every byte of its output
  written but not yet renamed into place); while it runs, its outputs are polled: each is
  absent or intact at every moment; ``dvc repro`` then recovers, and the whole dvc.lock (every
  output's hash) and the metrics are those of the uninterrupted run;
* truncated and bit-flipped feature files and checkpoints, non-finite features, a file-size
  limit (a full disk) while a stage writes: one clear error naming the file and the fix, the
  stage's previous outputs untouched, and the advised ``dvc checkout`` restores the file.
"""

from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import REPO, make_mvtec_root, tiny_params
from PIL import Image

from ccnf.config import load_params
from ccnf.errors import CcnfError
from ccnf.evaluate import evaluate_task
from ccnf.features import FeatureMeta, load_split
from ccnf.models import read_checkpoint
from ccnf.store import load_artifact, load_npz, read_json, save_artifact
from ccnf.train import train_task

FAILPOINT = Path(__file__).resolve().parent / "failpoint"

# stage -> (its command's argv tail, outputs, failpoint mode, the output a rename kill targets)
KILLS = {
    "extract": ("stages/extract.py", ["features"], "write", None),
    "train@t0": ("stages/train.py --task t0", ["models/t0"], "rename", "models/t0"),
    "evaluate@t1": ("stages/evaluate.py --task t1", ["eval/t1", "metrics/tasks/t1.json"],
                    "write", None),
    "aggregate": ("stages/aggregate.py", ["metrics/summary.json", "metrics/matrices.json",
                                          "metrics/per_class.json", "plots"],
                  "rename", "metrics/summary.json"),
}
METRICS = ["metrics/summary.json", "metrics/matrices.json", "metrics/per_class.json",
           "metrics/tasks/t0.json", "metrics/tasks/t1.json"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], **extra}


def _dvc(*args: str, cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, env=_env(PYTHONPATH=str(cwd), **env))
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A tiny study (2 tasks x 1 class) after one uninterrupted ``dvc repro``."""
    work = tmp_path_factory.mktemp("faults_study")
    for item in ("ccnf", "stages"):
        shutil.copytree(REPO / item, work / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    root = make_mvtec_root(work / "external" / "ds", ["a", "b"], n_train=4, n_good=1, n_bad=1)
    raw = tiny_params(root, [["a"], ["b"]])
    raw["data"]["synthetic"].update(image_size=64, n_train=4, n_test_good=1, n_test_defect=2)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    _dvc("init", "-q", cwd=work)
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")
    _dvc("repro", cwd=work)
    (work / "reference").mkdir()
    shutil.copy(work / "dvc.lock", work / "reference" / "dvc.lock")
    for m in METRICS:
        (work / "reference" / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / m, work / "reference" / m)
    return work


def _intact(path: Path) -> str | None:
    """Why the output at ``path`` is not intact; None when it is intact or absent."""
    if not path.exists():
        return None
    try:
        if path.name == "features":
            meta = FeatureMeta.load(path)
            for cls in meta.classes:
                for split in ("train", "test"):
                    load_split(path, cls, split)
        elif path.parent.name == "models":
            read_checkpoint(path)
            rows = list(csv.DictReader((path / "train_log.tsv").open(), delimiter="\t"))
            assert all(None not in r.values() for r in rows), "cut-off training log"
        elif path.parent.name == "eval":
            for kind in ("image_scores", "gallery"):
                load_npz(path / f"{kind}.npz", kind=kind, what="evaluation output")
        elif path.suffix == ".json":
            read_json(path, what="metrics")
        elif path.name == "plots":
            for png in path.glob("*.png"):
                with Image.open(png) as img:
                    img.verify()
        else:
            return f"unknown output {path}"
    except (CcnfError, OSError, AssertionError, SyntaxError) as err:
        return f"{path}: {err}"
    return None


def _stage_alive(dvc_proc: psutil.Process, argv: str) -> bool:
    try:
        return any(" ".join(c.cmdline()).endswith(argv)
                   for c in dvc_proc.children(recursive=True))
    except psutil.Error:
        return False


def _temporaries(work: Path) -> list[Path]:
    """Temporaries of atomic writes anywhere in the workspace (DVC's and git's own excluded)."""
    return [p for p in work.rglob(".*.tmp") if ".dvc" not in p.parts and ".git" not in p.parts]


def _forget_cached_outputs(study: Path, stage: str) -> None:
    """Delete the DVC cache objects of ``stage``'s outputs (for a directory its ``.dir``
    listing, without which DVC cannot check it out)."""
    lock = yaml.safe_load((study / "dvc.lock").read_text())
    for out in lock["stages"][stage]["outs"]:
        md5 = out.get("md5")
        obj = study / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        if obj.exists():
            obj.chmod(0o644)
            obj.unlink()


@pytest.mark.parametrize("stage", list(KILLS))
def test_kill_9_mid_stage_leaves_no_partial_output_and_repro_recovers(
    study: Path, stage: str, faults
) -> None:
    argv, outs, mode, target = KILLS[stage]
    env = _env(PYTHONPATH=os.pathsep.join([str(FAILPOINT), str(study)]), CCNF_FAULT_ARGV=argv,
               CCNF_FAULT_MODE=mode, CCNF_FAULT_TARGET=str(study / (target or "-")))
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item",
                             stage], cwd=study, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watcher, polls = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        # while the stage runs (DVC has removed its old outputs by then), every output is
        # absent or complete at every poll
        if _stage_alive(watcher, argv):
            polls += 1
            for out in outs:
                why = _intact(study / out)
                assert faults.check(why is None, f"{stage} (running): {why}"), why
        time.sleep(0.02)
    log = proc.stdout.read() if proc.stdout else ""
    # killed by SIGKILL, as intended: DVC reports -9 when it runs the command itself, 137 when
    # a shell in between reports the signal as its exit status (CI's environment)
    assert proc.returncode != 0 and ("-9" in log or "exited with 137" in log), log
    faults.inject("kill -9 of a stage", detail=f"{stage}, {mode}")
    assert polls > 0, "the stage was never seen running"
    for out in outs:
        why = _intact(study / out)
        assert faults.check(why is None, f"{stage} (killed): {why}"), why

    # as if this had been the stage's first run: DVC holds no cached copy of its outputs to
    # restore, so `dvc repro` must run it again (and that re-run must give the same bytes)
    _forget_cached_outputs(study, stage)
    rerun = _dvc("repro", "--no-run-cache", cwd=study)
    assert f"Running stage '{stage}'" in rerun.stdout
    assert "Data and pipelines are up to date" in _dvc("status", cwd=study).stdout
    # every output (hash in dvc.lock) and every metrics file as in the uninterrupted run
    same_lock = (study / "dvc.lock").read_text() == (study / "reference/dvc.lock").read_text()
    assert faults.check(same_lock, f"{stage}: dvc.lock after recovery"), "outputs differ"
    for m in METRICS:
        same = (study / m).read_bytes() == (study / "reference" / m).read_bytes()
        assert faults.check(same, f"{stage}: {m} after recovery"), m
    # the killed process could not remove its temporary; the re-run's write of it did
    assert _temporaries(study) == []


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def _copy_features(study: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "features"
    shutil.copytree(study / "features", dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_damaged_feature_file_stops_training_with_one_error(
    study: Path, tmp_path: Path, damage: str, faults
) -> None:
    params = load_params(study / "params.yaml")
    feats = _copy_features(study, tmp_path)
    target = feats / "a" / "train.pt"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        _flip(target, target.stat().st_size - 100)  # in the tensor bytes, past the header
    faults.inject("bit flip" if damage == "bit flip" else "truncation")
    with pytest.raises(CcnfError) as info:
        train_task(params, "t0", feats, study / "models/init", tmp_path / "out")
    msg = info.value.render()
    assert str(target) in msg and "dvc checkout" in msg and "extract" in msg
    assert ("checksum mismatch" in msg) == (damage == "bit flip")
    assert faults.check(not (tmp_path / "out").exists(), "no checkpoint from damaged features")


def test_damaged_checkpoint_names_the_file_and_dvc_checkout_restores_it(
    study: Path, faults
) -> None:
    """The advice printed is the fix: `dvc checkout --force models/t0` brings it back."""
    path = study / "models/t0/model.pt"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) - 7])
    faults.inject("truncation")
    proc = subprocess.run([sys.executable, "stages/evaluate.py", "--task", "t0"], cwd=study,
                          capture_output=True, text=True, env=_env(PYTHONPATH=str(study)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    flat = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "models/t0/model.pt" in flat and "dvc checkout --force models/t0" in flat
    assert "train@t0" in flat
    fix = re.search(r"dvc checkout --force (\S+);", flat)
    assert fix is not None
    _dvc("checkout", "--force", fix.group(1), cwd=study)
    assert faults.check(path.read_bytes() == original, "checkpoint restored by dvc checkout")
    assert "Data and pipelines are up to date" in _dvc("status", cwd=study).stdout


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_cached_features_stop_training_naming_class_and_file(
    study: Path, tmp_path: Path, value: float, faults
) -> None:
    params = load_params(study / "params.yaml")
    feats = _copy_features(study, tmp_path)
    target = feats / "a" / "train.pt"
    split = load_artifact(target, kind="features", fix="")
    split["features"][1][2, 0, 1, 1] = value  # a valid, checksummed file holding a NaN/Inf
    save_artifact(target, split, kind="features")
    faults.inject("non-finite features")
    with pytest.raises(CcnfError) as info:
        train_task(params, "t0", feats, study / "models/init", tmp_path / "out")
    msg = info.value.render()
    assert "class 'a' (train)" in msg and "NaN/Inf" in msg and str(target) in msg
    assert faults.check(not (tmp_path / "out").exists(), "no checkpoint from NaN features")


def test_non_finite_cached_test_features_stop_evaluation(
    study: Path, tmp_path: Path, faults
) -> None:
    params = load_params(study / "params.yaml")
    feats = _copy_features(study, tmp_path)
    target = feats / "b" / "test.pt"
    split = load_artifact(target, kind="features", fix="")
    split["features"][0][0, 3] = float("-inf")
    save_artifact(target, split, kind="features")
    faults.inject("non-finite features")
    out = tmp_path / "metrics.json"
    with pytest.raises(CcnfError) as info:
        evaluate_task(params, "t1", feats, study / "models/t1", out, tmp_path / "eval")
    msg = info.value.render()
    assert "class 'b' (test)" in msg and "NaN/Inf" in msg and str(target) in msg
    ok = not out.exists() and not (tmp_path / "eval").exists()
    assert faults.check(ok, "no evaluation output from NaN features")


def test_disk_full_while_a_stage_writes_leaves_the_old_output_and_one_error(
    study: Path, faults
) -> None:
    """A real file-size limit (RLIMIT_FSIZE: the kernel refuses to grow a file, as on a full
    disk) while train@t0 writes its checkpoint, run as DVC would run it."""
    before = {p: p.read_bytes() for p in (study / "models/t0").iterdir()}
    limit = (study / "models/t0/model.pt").stat().st_size // 3

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "stages/train.py", "--task", "t0"], cwd=study,
                          capture_output=True, text=True, env=_env(PYTHONPATH=str(study)),
                          preexec_fn=small_files)
    faults.inject("disk full")
    flat = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no room to write models/t0" in flat and "File too large" in flat
    after = {p: p.read_bytes() for p in (study / "models/t0").iterdir()}
    assert faults.check(after == before, "models/t0 after a full disk")
    assert _temporaries(study) == []
    assert "Data and pipelines are up to date" in _dvc("status", cwd=study).stdout


def test_stage_outputs_hold_no_pickle(study: Path) -> None:
    """Checkpoints and feature files are safetensors artefacts (never a torch pickle/zip)."""
    files = [*study.glob("models/*/model.pt"), *study.glob("features/*/*.pt")]
    assert len(files) == 3 + 4
    for f in files:
        head = f.read_bytes()[:8]
        assert head[:2] != b"PK" and head[:1] != b"\x80", f
        with pytest.raises(Exception):  # noqa: B017 - any refusal; torch must not read it
            torch.load(f, weights_only=True)


def test_extract_refuses_to_cache_features_that_overflow_float16(faults) -> None:
    """A backbone output beyond float16's range becomes inf in the cache: extract stops,
    naming the images, instead of writing it."""
    from ccnf.data.manifest import Record
    from ccnf.features import _refuse_non_finite

    records = [Record("a", "train", "good", f"a/train/good/{i:03d}.png", None, "0")
               for i in range(3)]
    feats = torch.ones(3, 2, 2, 2)
    feats[1, 0, 1, 1] = 1e5  # float16 tops out at 65504
    faults.inject("non-finite features")
    _refuse_non_finite(torch.ones(3, 2, 2, 2).half(), records, "a", "train", 0, torch.float16)
    with pytest.raises(CcnfError) as info:
        _refuse_non_finite(feats.half(), records, "a", "train", 0, torch.float16)
    msg = info.value.render()
    assert "a/train/good/001.png" in msg and "000.png" not in msg and "float32" in msg
