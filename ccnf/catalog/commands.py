"""Running DVC: its environment, captured and streamed ``dvc`` calls, commands that leave
children behind (``dvc queue start``), and the experiment names DVC holds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ccnf.errors import CcnfError


def dvc_env() -> dict[str, str]:
    """Environment for DVC and the stages it runs.

    ``PYTHONPATH=.`` first, so that whatever a stage runs imports the ccnf of the directory it
    runs in (DVC's temporary copy of the experiment), never the checkout that ``pip install -e``
    points to (the user's workspace, possibly edited meanwhile). stages/_common.py does the
    same for the stage scripts; this covers any other command.
    """
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (".", env.get("PYTHONPATH", "")) if p)
    return env


def dvc(
    args: Sequence[str], cwd: Path, *, check: bool = True, leaves_children: bool = False
) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` with this interpreter's DVC (no analytics), output captured.

    ``leaves_children``: the command forks processes that outlive it (``dvc queue start``); its
    output is then captured through :func:`run_leaving_children`, never a pipe.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    if leaves_children:
        proc = run_leaving_children(cmd, cwd)
    else:
        proc = subprocess.run(cmd, cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CcnfError(
            f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n"
            + (proc.stderr.strip() or proc.stdout.strip())[-3000:],
            where=str(cwd),
        )
    return proc


def run_leaving_children(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command whose child processes outlive it; stdout and stderr together as stdout.

    ``dvc queue start`` forks the queue's workers and returns. They inherit its output handles,
    so these go to a temporary file, never a pipe: reading a pipe to its end would wait for the
    workers to exit, that is for the whole queue to drain.
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(list(cmd), cwd=cwd, env=dvc_env(), stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        out.seek(0)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out.read(), "")


def stream_dvc(args: Sequence[str], cwd: Path, on_line: Callable[[str], None]) -> tuple[int, str]:
    """Run ``dvc ARGS``, calling ``on_line`` for each output line; (exit code, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=cwd, env=dvc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        on_line(line.rstrip("\n"))
    return proc.wait(), "".join(lines)


STAGE_RE = re.compile(r"Running stage '([^']+)'")


def existing_names(cwd: Path) -> set[str]:
    """Names of the experiments DVC holds for the current baseline commit (HEAD)."""
    out = dvc(["exp", "list", "--name-only"], cwd).stdout
    return {ln.strip() for ln in out.splitlines() if ln.strip()}
