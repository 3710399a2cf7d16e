"""DVC's experiment queue as seen from outside: ``dvc queue status`` parsed from its text,
and which queue workers are alive (from DVC's worker files and the process table).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ccnf.catalog.commands import dvc


@dataclass(frozen=True)
class QueueStatus:
    """What ``dvc queue status`` says: name -> state, and how many workers it sees."""

    entries: dict[str, str]
    workers: int | None  # active + idle workers; None when DVC printed no worker line


WORKER_RE = re.compile(r"Worker status:\s*(\d+)\s+active,\s*(\d+)\s+idle")


def parse_queue_status(out: str) -> QueueStatus:
    """Parse ``dvc queue status`` (DVC 3.x): task rows and the "Worker status" line."""
    names: dict[str, str] = {}
    for ln in out.splitlines():
        cells = ln.split()
        # "<task id> <name> <created: Mon DD HH:MM or HH:MM> <status>"
        if len(cells) >= 4 and re.fullmatch(r"[0-9a-f]{7,40}", cells[0]):
            names[cells[1]] = cells[-1]
    m = WORKER_RE.search(out)
    return QueueStatus(names, None if m is None else int(m.group(1)) + int(m.group(2)))


def queue_status(cwd: Path) -> QueueStatus:
    return parse_queue_status(dvc(["queue", "status"], cwd, check=False).stdout)


def queued_names(cwd: Path) -> dict[str, str]:
    """name -> status of the entries ``dvc queue status`` lists (queued, running, failed...)."""
    return queue_status(cwd).entries


def live_workers(cwd: Path) -> int:
    """Queue worker processes of this repository that are alive.

    ``dvc queue start`` records each worker it spawns in
    ``.dvc/tmp/exps/celery/<worker>.json`` (``{"pid": ...}``); a worker counts when that
    process exists and is a ``dvc exp queue-worker``. This sees a worker from the moment it
    is spawned, when ``dvc queue status`` may not list it yet (or, busy, may miss it).
    """
    import psutil  # a DVC dependency

    count = 0
    for info in (cwd / ".dvc" / "tmp" / "exps" / "celery").glob("*.json"):
        try:
            pid = int(json.loads(info.read_text()).get("pid"))
            if "queue-worker" in " ".join(psutil.Process(pid).cmdline()):
                count += 1
        except (ValueError, TypeError, OSError, AttributeError, psutil.Error):
            continue  # no pid, not running any more, or not ours
    return count


def workers_alive(cwd: Path, status: QueueStatus) -> bool:
    return bool(status.workers) or live_workers(cwd) > 0
