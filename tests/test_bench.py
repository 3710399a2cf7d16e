from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_mvtec_root, tiny_params

from ccnf.bench import (
    SHIM,
    _read_stage_log,
    figure,
    measure,
    per_item_ms,
    rate,
    render,
    run_bench,
    snapshot_repo,
    stage_memory,
    target,
)
from ccnf.config import parse_params
from ccnf.data.manifest import index_root
from ccnf.errors import CcnfError

# -- the measuring helpers ----------------------------------------------------------------------


def test_measure_runs_warmup_then_repeats() -> None:
    calls = []
    times = measure(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 0 for t in times)
    synced = []
    measure(lambda: None, 2, warmup=0, sync=lambda: synced.append(1))
    assert len(synced) == 2
    with pytest.raises(ValueError):
        measure(lambda: None, 0)


def test_figure_is_the_median_of_the_runs() -> None:
    fig = figure([3.0, 1.0, 2.0, 10.0, 2.5], "s")
    assert fig == {
        "median": 2.5, "min": 1.0, "max": 10.0, "runs": [3.0, 1.0, 2.0, 10.0, 2.5], "unit": "s"
    }
    assert figure([1.0, 2.0], "s")["median"] == 1.5
    with pytest.raises(ValueError):
        figure([], "s")


def test_rates_and_latencies() -> None:
    assert rate([0.5, 1.0, 2.0], 32, "images/s")["median"] == 32.0
    assert per_item_ms([0.5, 1.0, 2.0], 10)["median"] == 100.0


def test_targets() -> None:
    assert target("extraction_vs_forward", 0.9)["met"] is True
    assert target("extraction_vs_forward", 0.7)["met"] is False
    assert target("flow_scoring_vs_backbone", 0.5)["met"] is True
    assert target("experiment_vs_repro", 0.41)["met"] is False
    row = target("experiment_vs_repro", None)
    assert row["met"] is None and row["value"] is None and row["target"] == "<= 0.4"


# -- end-to-end helpers -------------------------------------------------------------------------


def test_stage_shim_logs_peak_rss_and_stage_names(tmp_path: Path) -> None:
    shim = tmp_path / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("x = bytearray(80 * 2**20)\n")
    log = tmp_path / "log.jsonl"
    env = {"CCNF_BENCH_STAGE_LOG": str(log), "PATH": "/usr/bin:/bin"}
    subprocess.run([str(shim), "stages/train.py", "--task", "t3"], cwd=tmp_path, env=env,
                   check=True)
    subprocess.run([str(shim), "-c", "pass"], cwd=tmp_path, env=env, check=True)
    failed = subprocess.run([str(shim), "-c", "raise SystemExit(3)"], cwd=tmp_path, env=env)
    assert failed.returncode == 3  # the stage's exit status passes through
    rows = _read_stage_log(log)
    assert [r["stage"] for r in rows] == ["train@t3"]  # not-a-stage calls are left out
    assert rows[0]["max_rss_mb"] >= 80 and rows[0]["rc"] == 0
    mem = stage_memory({"repro": {"stages": rows}, "experiment": {"stages": []}})
    assert mem["stages"]["train@t3"]["max_rss_mb"] == rows[0]["max_rss_mb"]
    assert mem["peak_mb"] == rows[0]["max_rss_mb"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True, text=True,
    ).stdout


def test_snapshot_holds_the_working_tree_committed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("/outputs\n")
    (repo / "kept.txt").write_text("committed\n")
    (repo / "gone.txt").write_text("to delete\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    (repo / "kept.txt").write_text("edited, not committed\n")
    (repo / "gone.txt").unlink()
    (repo / "new.txt").write_text("untracked\n")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "big.bin").write_text("ignored output\n")

    snap = snapshot_repo(repo, tmp_path / "snap")
    assert (snap / "kept.txt").read_text() == "edited, not committed\n"
    assert (snap / "new.txt").is_file()
    assert not (snap / "gone.txt").exists()
    assert not (snap / "outputs").exists()
    assert _git(snap, "status", "--porcelain") == ""
    assert (repo / "kept.txt").read_text() == "edited, not committed\n"  # source untouched

    head = snapshot_repo(repo, tmp_path / "head", committed_only=True)
    assert (head / "kept.txt").read_text() == "committed\n"

    with pytest.raises(CcnfError, match="not a git repository"):
        snapshot_repo(tmp_path / "snap" / "outputs-none", tmp_path / "x")


# -- a tiny real run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    root = make_mvtec_root(tmp / "ds", ["a", "b"], n_train=6, n_good=2, n_bad=2, size=32)
    raw = tiny_params(root, [["a", "b"]])
    raw["data"].update(image_size=32, mask_size=16)
    raw["backbone"].update(weights="random", batch_size=4)
    raw["device"] = "cpu"
    raw["flow"]["n_couplings"] = [3, 2]  # per level, as the study's default
    params_path = tmp / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    floor = raw["train"]["min_steps_per_class"]
    # a two-row catalog of these params: the bench multiplies its steps by the task's step time
    (tmp / "catalog.yaml").write_text(yaml.safe_dump({
        "reference": "E11", "ci_subset": [],
        "experiments": {
            "E11": {"description": "the params", "overrides": []},
            "twice": {"description": "twice the step floor",
                      "overrides": [f"train.min_steps_per_class={2 * floor}"]},
        },
    }))
    params = parse_params(raw)
    manifest_path = tmp / "data" / "manifest.json"
    index_root(root, params.classes, progress=False).save(manifest_path)
    out = tmp / "metrics" / "bench.json"
    result = run_bench(
        params_path, out, repo=tmp, repeats=2, e2e=False, class_counts=(2, 4),
        command="pytest",
    )
    return out, result


def test_bench_json_layout(tiny_run) -> None:
    out, result = tiny_run
    assert json.loads(out.read_text()) == result
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # atomic: no leftovers
    assert result["errors"] == {}
    assert result["schema"] == 1 and result["command"] == "pytest"
    assert result["device"]["setting"] == "cpu" and result["device"]["type"] == "cpu"
    assert result["threads"]["flow"] == 1  # params.threads, as the train/evaluate stages
    ext = result["extraction"]
    assert ext["images"] == 10 and ext["batch_size"] == 4
    for key in ("stage_images_per_s", "forward_images_per_s", "stage_forward_images_per_s"):
        assert len(ext[key]["runs"]) == 2 and ext[key]["median"] > 0
    assert ext["ratio"] > 0
    tr = result["training"]
    # images_per_step x min(patches_per_image, H*W) per level: grids 4x4 and 2x2 at 32 px
    assert tr["vectors_per_step"] == 4 * (16 + 4)
    assert tr["n_couplings"] == [3, 2]
    # each level's vectors through its own couplings: 4 x 16 x 3 + 4 x 4 x 2 block passes
    assert tr["vectors_per_s_per_coupling"]["median"] == pytest.approx(
        tr["vectors_per_s"]["median"] * (4 * 16 * 3 + 4 * 4 * 2) / (4 * (16 + 4)), rel=1e-3
    )
    assert tr["task"]["task"] == "t0" and tr["task"]["steps"] > 0
    assert tr["task"]["features"].startswith("bench subset")  # tmp has no full cache
    inf = result["inference"]
    for key in ("flow_ms", "scoring_ms", "postprocess_ms", "score_images_ms"):
        assert inf[key]["unit"] == "ms" and inf[key]["median"] > 0
    assert inf["passes"]["every_patch_in_one_pass"] is True
    assert inf["passes"]["flow_calls_per_batch"] == inf["passes"]["levels"]
    sel = result["class_selection"]
    assert {"batch_images", "function", "passes_per_level_per_class", "2", "4"} <= set(sel)
    assert sel["passes_per_level_per_class"] == 1.0  # one pass per level, class and batch
    assert sel["4"]["likelihood_ms"]["median"] > 0 and sel["2"]["prototype_ms"]["median"] > 0
    assert result["memory"]["stages"] is None and "e2e" not in result
    targets = result["targets"]
    assert set(targets) == {
        "extraction_vs_forward", "flow_scoring_vs_backbone", "experiment_vs_repro",
        "flow_passes_per_class", "catalog_training_minutes",
    }
    cat = result["catalog"]
    # one task of two classes, 5 fit images each (6 less the calibration image), 4 a step and
    # one epoch: 3 steps, below the floor of 2 classes x min_steps_per_class (2, then 4)
    assert cat["experiments"] == 2 and cat["steps"] == 2 * 2 + 2 * 4
    assert cat["ms_per_step"] == tr["task"]["ms_per_step"]["median"] > 0
    assert cat["minutes"] == pytest.approx(cat["steps"] * cat["ms_per_step"] / 2 / 60e3,
                                           abs=0.01)
    assert targets["catalog_training_minutes"]["value"] == pytest.approx(cat["minutes"])
    assert targets["experiment_vs_repro"]["met"] is None  # --no-e2e: not measured
    assert targets["flow_passes_per_class"]["met"] is True
    for name in ("extraction_vs_forward", "flow_scoring_vs_backbone"):
        assert isinstance(targets[name]["met"], bool) and targets[name]["value"] > 0


def test_render_prints_every_target(tiny_run, capsys) -> None:
    from rich.console import Console

    _, result = tiny_run
    render(result, Console(width=200, force_terminal=False))
    text = capsys.readouterr().out
    for name in result["targets"]:
        assert name in text
    assert "class selection, 4 classes: likelihood" in text


def test_bench_needs_a_manifest(tmp_path: Path, raw_params) -> None:
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw_params))
    with pytest.raises(CcnfError, match="manifest not found"):
        run_bench(params_path, tmp_path / "bench.json", repo=tmp_path, e2e=False)
    assert not (tmp_path / "bench.json").exists()


def test_e2e_times_repro_then_a_params_only_experiment(tmp_path: Path) -> None:
    """The real machinery (snapshot, shim, dvc repro, dvc exp run) on a two-stage toy project."""
    from rich.console import Console

    from ccnf.bench import bench_e2e

    repo = tmp_path / "toy"
    (repo / "stages").mkdir(parents=True)
    (repo / "stages" / "extract.py").write_text(
        "from pathlib import Path\nPath('features').mkdir(exist_ok=True)\n"
        "Path('features/a.bin').write_bytes(bytes(300_000))\n"
    )
    (repo / "stages" / "train.py").write_text(
        "import yaml\nfrom pathlib import Path\nx = bytearray(60 * 2**20)\n"
        "lam = yaml.safe_load(open('params.yaml'))['loss']['lambda_center']\n"
        "Path('models').mkdir(exist_ok=True)\nPath('models/m.txt').write_text(str(lam))\n"
    )
    (repo / "params.yaml").write_text("loss:\n  lambda_center: 1.0\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  extract:\n    cmd: python stages/extract.py\n    deps: [stages/extract.py]\n"
        "    outs: [features]\n"
        "  train:\n    cmd: python stages/train.py --task t0\n"
        "    deps: [stages/train.py, features]\n    params: [loss.lambda_center]\n"
        "    outs: [models]\n"
    )
    _git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "toy")
    work = tmp_path / "work"
    work.mkdir()

    out = bench_e2e(repo, work, Console(quiet=True))
    assert out["repro"]["stages_run"] == ["extract", "train@t0"]
    assert out["experiment"]["stages_run"] == ["train@t0"]  # features are not re-extracted
    assert out["ratio"] == pytest.approx(
        out["experiment"]["seconds"] / out["repro"]["seconds"], rel=1e-3)
    assert out["feature_cache"]["mb"] == 0.3 and out["feature_cache"]["files"] == 1
    assert (work / "repo" / "models" / "m.txt").read_text() == "0.1"
    mem = stage_memory(out)
    assert mem["stages"]["train@t0"]["max_rss_mb"] >= 60
    assert not (repo / "models").exists()  # the source repository is untouched
