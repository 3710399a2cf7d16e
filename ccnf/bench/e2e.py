"""The end-to-end section of ``ccnf bench`` and the memory figures it yields: ``dvc repro``
from nothing vs a params-only ``dvc exp run`` in a throw-away snapshot of the repository,
each DVC stage's peak RSS and wall time (through a ``python`` shim), and the caches' sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from ccnf.bench.harness import EXPERIMENT, dir_size
from ccnf.errors import CcnfError

SHIM = """#!{python}
# ccnf bench: runs a DVC stage's python and logs its peak RSS (RUSAGE_CHILDREN) and wall time
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call([{python!r}, *sys.argv[1:]])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(os.environ["CCNF_BENCH_STAGE_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "seconds": time.perf_counter() - t0,
                         "max_rss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime,
                         "rc": rc}}) + "\\n")
sys.exit(rc)
"""


def _git(repo: Path, *args: str) -> str:
    res = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.name=ccnf bench",
            "-c",
            "user.email=bench@localhost",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise CcnfError(
            f"git {' '.join(args)} failed in {repo}: {res.stderr.strip()[-500:]}",
            fix="the end-to-end bench needs a git repository (or run with --no-e2e)",
        )
    return res.stdout


def snapshot_repo(repo: Path, dest: Path, *, committed_only: bool = False) -> Path:
    """A throw-away clone of ``repo`` holding its current working tree, committed.

    The clone has no DVC outputs and its own (empty) DVC cache. Unless ``committed_only``,
    the working tree's tracked and untracked-but-not-ignored files are copied over the
    checkout (deleted ones removed), so uncommitted changes are measured too.
    """
    repo = Path(repo).resolve()
    if not (repo / ".git").exists():
        raise CcnfError(f"not a git repository: {repo}", fix="run ccnf bench from the repo root")
    res = subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(repo), str(dest)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise CcnfError(f"git clone of {repo} failed: {res.stderr.strip()[-500:]}")
    if not committed_only:
        listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
        for rel in filter(None, listed.split("\0")):
            src, dst = repo / rel, dest / rel
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif not src.exists() and dst.exists():
                dst.unlink()
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "--allow-empty", "-m", "ccnf bench snapshot")
    return dest


def _stage_name(argv: list[str]) -> str | None:
    if not argv or not argv[0].startswith("stages/"):
        return None
    name = Path(argv[0]).stem
    if "--task" in argv:
        name += "@" + argv[argv.index("--task") + 1]
    return name


def _read_stage_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        name = _stage_name(row["argv"])
        if name is not None:
            rows.append(
                {
                    "stage": name,
                    "seconds": round(row["seconds"], 2),
                    "max_rss_mb": round(row["max_rss_kb"] / 1024, 1),
                    "cpu_s": round(row["cpu_s"], 2),
                    "rc": row["rc"],
                }
            )
    return rows


def _dvc() -> str:
    exe = Path(sys.executable).parent / "dvc"
    found = str(exe) if exe.is_file() else shutil.which("dvc")
    if not found:
        raise CcnfError("dvc not found", fix="pip install -e . (dvc is a dependency of ccnf)")
    return found


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise CcnfError(
            f"{' '.join(cmd[1:])} failed (exit {res.returncode}) in the bench snapshot {cwd}:\n    "
            + "\n    ".join(tail),
            fix="make `dvc repro` pass in the repository first (or run with --no-e2e)",
        )
    return secs


def bench_e2e(
    repo: Path, work: Path, console: Console, *, committed_only: bool = False
) -> dict[str, Any]:
    """Full ``dvc repro`` from nothing, then a params-only ``dvc exp run`` from its state."""
    snap = snapshot_repo(repo, work / "repo", committed_only=committed_only)
    shim_dir = work / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [str(shim_dir), str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("VIRTUAL_ENV", None)
    log = work / "dvc.log"
    dvc = _dvc()
    out: dict[str, Any] = {"snapshot": "committed HEAD" if committed_only else "working tree"}
    phases = [
        ("repro", [dvc, "repro"]),
        ("experiment", [dvc, "exp", "run", "-S", EXPERIMENT]),
    ]
    for phase, cmd in phases:
        stage_log = work / f"stages_{phase}.jsonl"
        env["CCNF_BENCH_STAGE_LOG"] = str(stage_log)
        console.print(f"[dim]bench e2e: {' '.join(['dvc', *cmd[1:]])} in {snap}[/]")
        secs = _run_logged(cmd, snap, env, log)
        stages = _read_stage_log(stage_log)
        out[phase] = {
            "command": " ".join(["dvc", *cmd[1:]]),
            "seconds": round(secs, 2),
            "stages": stages,
            "stages_run": [s["stage"] for s in stages],
        }
    out["ratio"] = round(out["experiment"]["seconds"] / out["repro"]["seconds"], 4)
    out["feature_cache"] = dir_size(snap / "features")
    out["dvc_cache"] = dir_size(snap / ".dvc" / "cache")
    return out


def stage_memory(e2e: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS per stage over both end-to-end runs (MB), and the largest of all."""
    per: dict[str, dict[str, float]] = {}
    for phase in ("repro", "experiment"):
        for row in e2e.get(phase, {}).get("stages", []):
            cur = per.setdefault(row["stage"], {"max_rss_mb": 0.0, "seconds": row["seconds"]})
            cur["max_rss_mb"] = max(cur["max_rss_mb"], row["max_rss_mb"])
            if phase == "repro":
                cur["seconds"] = row["seconds"]
    peak = max((v["max_rss_mb"] for v in per.values()), default=None)
    return {"stages": per, "peak_mb": peak}
