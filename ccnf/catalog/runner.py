"""Running catalog experiments through DVC: workspace checks, replacing or keeping earlier
experiments of the same name, ``dvc exp run --temp`` one after the other
(:func:`run_sequential`) or DVC's queue with N workers (:func:`run_queue`), and what each
run did (:class:`RunOutcome`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ccnf.catalog.commands import STAGE_RE, dvc, existing_names, stream_dvc
from ccnf.catalog.polling import queue_status, workers_alive
from ccnf.catalog.records import load_records, match_records
from ccnf.catalog.schema import CATALOG_FILE, Catalog, Experiment
from ccnf.errors import CcnfError

# DVC stage names that must never run in a catalog experiment (the features are shared)
SHARED_STAGES = ("synth", "prepare", "extract")


def check_workspace(cwd: Path) -> None:
    """Refuse to run experiments on an uncommitted params.yaml/dvc.yaml/catalog change.

    ``dvc exp run --temp/--queue`` carries uncommitted changes of tracked files into every
    experiment; a changed params.yaml would silently become part of every catalog run.
    """
    proc = subprocess.run(["git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml",
                           str(CATALOG_FILE)], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CcnfError("not a git repository (DVC experiments need one)", where=str(cwd),
                        fix="git init && git add -A && git commit -m study")
    dirty = [ln[3:] for ln in proc.stdout.splitlines() if ln.strip()]
    if dirty:
        raise CcnfError(
            f"uncommitted changes in {', '.join(dirty)}: they would leak into every experiment",
            where=str(cwd),
            fix="commit them (experiments derive from HEAD), or revert them",
        )
    # DVC's temporary copies hold tracked files only: an untracked module would be missing there
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                           "ccnf", "stages"], cwd=cwd, capture_output=True, text=True)
    untracked = [ln[3:] for ln in proc.stdout.splitlines()
                 if ln.startswith("??") and ln.endswith(".py")]
    if untracked:
        raise CcnfError(
            f"untracked source files {', '.join(untracked)}: DVC runs experiments in temporary "
            "copies of the git tree, where they would be missing",
            where=str(cwd),
            fix="git add (and commit) them, or move them out of ccnf/ and stages/",
        )


def head_commit(cwd: Path) -> str:
    """The commit HEAD names in ``cwd`` (experiments are kept under the commit they ran on)."""
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True)
    return proc.stdout.strip()


def not_held_reason(head_at_start: str, head_now: str) -> str:
    """Why an experiment DVC reports successful is not among HEAD's experiments.

    The usual cause is a commit while the queue ran: DVC keeps each experiment under the commit
    it was queued on, and ``dvc exp list`` shows HEAD's only.
    """
    if head_at_start and head_now and head_at_start != head_now:
        return (f"DVC reports success, but HEAD moved from {head_at_start[:7]} to "
                f"{head_now[:7]} while the queue ran (a commit during the run): the experiment "
                f"is kept under {head_at_start[:7]} (`dvc exp show --rev {head_at_start[:7]}`); "
                "run the same command again to run it on the new HEAD, and commit only after "
                "the queue has drained")
    return "DVC reports success but holds no experiment of this name"


def remove_existing(ids: Sequence[str], cwd: Path, log: Callable[[str], None], *,
                    queue: bool = False) -> None:
    """Remove earlier experiments with these names, so a re-run replaces them.

    DVC refuses ``-n NAME`` when an experiment of that name exists (its ``-f`` would also
    force every stage, extraction included, to re-run). With ``queue`` also drop queue entries
    of these names (finished or failed ones), whose status would be mistaken for the new run's.
    """
    done = existing_names(cwd) & set(ids)
    if done:
        dvc(["exp", "remove", *sorted(done)], cwd)
        log(f"replaced earlier experiment(s): {', '.join(sorted(done))}")
    if not queue:
        return
    status = queue_status(cwd)
    pending = {n: s for n, s in status.entries.items() if n in set(ids)}
    # an entry left "Running" by a worker that died stays so for ever and cannot be removed:
    # kill it first (only when no worker is alive, so a live run is never touched)
    stuck = sorted(n for n, s in pending.items() if s == "Running")
    if stuck and not workers_alive(cwd, status):
        dvc(["queue", "kill", *stuck], cwd, check=False)
        log(f"cleared queue entries whose worker had died: {', '.join(stuck)}")
    if pending:
        dvc(["queue", "remove", *sorted(pending)], cwd, check=False)
        log(f"removed earlier queue entries: {', '.join(sorted(pending))}")


def finished_ids(catalog: Catalog, exps: Sequence[Experiment], cwd: Path) -> list[str]:
    """Ids of ``exps`` that already have a finished experiment on HEAD with their params.

    A re-run of the same command skips these, so that after a crash (a dead queue worker, a
    killed run) it finishes the rest. Nothing is skipped while tracked code under ccnf/ or
    stages/ differs from HEAD: those experiments would have run another code.
    """
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                           "ccnf", "stages"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0 or proc.stdout.strip():
        return []
    # only the experiments asked for, as rows: seed replicates (ID-seedN) are not catalog rows
    rows = match_records(replace(catalog, experiments={e.id: e for e in exps}),
                         load_records(cwd, commits=1))
    return [
        r.exp.id for r in rows
        if r.record is not None and r.record.kind == "experiment"
        and r.record.name == r.exp.id and r.record.metrics and r.problem is None
    ]


@dataclass
class RunOutcome:
    """What one catalog experiment did: time, stages DVC ran, success."""

    id: str
    seconds: float
    stages_run: list[str] = field(default_factory=list)
    ok: bool = True
    tail: str = ""

    @property
    def shared_stages_run(self) -> list[str]:
        """Stages that must have been reused (features shared) but ran."""
        # foreach stages run as name@item (synth@synthetic)
        return [s for s in self.stages_run if s.split("@")[0] in SHARED_STAGES]


def run_sequential(
    exps: Sequence[Experiment], cwd: Path, log: Callable[[str], None]
) -> list[RunOutcome]:
    """``dvc exp run --temp -n ID -S ...`` for each experiment, one after the other.

    ``--temp`` runs in a temporary copy (as the queue does) so the workspace, and therefore the
    next experiment's starting params.yaml, stays at HEAD.
    """
    outcomes = []
    for k, exp in enumerate(exps, 1):
        log(f"[{k}/{len(exps)}] {' '.join(exp.dvc_command(temp=True))}")
        stages: list[str] = []

        def on_line(line: str, stages: list[str] = stages, tag: str = f"[{k}/{len(exps)}] "
                    f"{exp.id}") -> None:
            m = STAGE_RE.search(line)
            if m:
                stages.append(m.group(1))
                log(f"    {tag}: {m.group(1)}")

        t0 = time.perf_counter()
        cmd = exp.dvc_command(temp=True)[1:]
        rc, out = stream_dvc(cmd, cwd, on_line)
        outcome = RunOutcome(exp.id, time.perf_counter() - t0, stages, rc == 0, out[-4000:])
        outcomes.append(outcome)
        log(f"    {exp.id}: {'done' if rc == 0 else 'FAILED'} in {outcome.seconds:.0f} s"
            + (f"; re-ran shared stages {outcome.shared_stages_run}!"
               if outcome.shared_stages_run else ""))
    return outcomes


POLL_S = 15.0  # seconds between two looks at the queue
DEAD_POLLS = 2  # polls in a row without a live worker, with work pending: the workers died
# a worker registers a moment after `dvc queue start` returns (it is spawned in the
# background): until one has been seen, allow it this long before calling it dead
STARTUP_GRACE_S = 60.0


def run_queue(
    exps: Sequence[Experiment], cwd: Path, jobs: int, log: Callable[[str], None],
    poll_s: float | None = None,
) -> list[RunOutcome]:
    """Queue every experiment, start ``jobs`` workers, wait until the queue has drained.

    Each experiment's seconds run from the first poll that saw it Running to the first that saw
    it finished (so they are accurate to about one poll, plus ``dvc queue status``'s own time).
    A poll costs about 1 s of CPU (a DVC process), hence the 15 s between polls: at 5 s the
    poller took about a tenth of a core from the experiments.

    If every worker dies (killed, out of memory) the queue would wait for ever, its entries
    "Running" or "Queued": after :data:`DEAD_POLLS` polls without a live worker (once one has
    been seen, or :data:`STARTUP_GRACE_S` after the start) the wait stops,
    those experiments are reported failed (why, per id) and their entries are cleared, so the
    same command run again finishes them. An experiment counts as done only when DVC reports
    success *and* holds an experiment of its name.
    """
    poll_s = POLL_S if poll_s is None else poll_s
    for exp in exps:
        dvc(exp.dvc_command(queue=True)[1:], cwd)
        log(f"queued {' '.join(exp.dvc_command(queue=True))}")
    t0 = time.perf_counter()
    head_at_start = head_commit(cwd)
    dvc(["queue", "start", "-j", str(jobs)], cwd, leaves_children=True)
    ids = {e.id for e in exps}
    started: dict[str, float] = {}
    finished: dict[str, RunOutcome] = {}
    last, empty_polls, dead_polls, seen_worker = "", 0, 0, False
    while True:
        queue = queue_status(cwd)
        status = {n: s for n, s in queue.entries.items() if n in ids}
        now = time.perf_counter()
        for name, state in status.items():
            if state == "Running":
                started.setdefault(name, now)
            if state in ("Success", "Failed") and name not in finished:
                finished[name] = RunOutcome(name, now - started.get(name, t0),
                                            ok=state == "Success")
        running = sorted(n for n, s in status.items() if s == "Running")
        line = (f"{len(finished)}/{len(ids)} finished"
                + (f"; running: {', '.join(running)}" if running else ""))
        if line != last:
            log(f"[{(now - t0) / 60:5.1f} min] {line}")
            last = line
        empty_polls = empty_polls + 1 if not status else 0
        pending = {n: s for n, s in status.items() if s in ("Queued", "Running")}
        alive = workers_alive(cwd, queue)
        seen_worker = seen_worker or alive
        may_be_dead = seen_worker or now - t0 > STARTUP_GRACE_S
        dead_polls = dead_polls + 1 if pending and not alive and may_be_dead else 0
        if len(finished) == len(ids) or empty_polls >= 3 or dead_polls >= DEAD_POLLS or (
            status and not pending
        ):
            break
        time.sleep(poll_s)
    if dead_polls >= DEAD_POLLS:
        log(f"[red]no queue worker is alive any more[/]; unfinished: {', '.join(sorted(pending))}")
        for name, state in pending.items():
            why = ("its queue worker died while it ran (killed or crashed)" if state == "Running"
                   else "never started: no queue worker was left to run it")
            finished[name] = RunOutcome(name, time.perf_counter() - started.get(name, t0),
                                        ok=False, tail=why)
        stuck = sorted(n for n, s in pending.items() if s == "Running")
        if stuck:
            dvc(["queue", "kill", *stuck], cwd, check=False)
        dvc(["queue", "remove", *sorted(pending)], cwd, check=False)
    for name in ids - set(finished):
        finished[name] = RunOutcome(name, time.perf_counter() - t0, ok=False,
                                    tail="not in `dvc queue status` any more")
    held = existing_names(cwd)
    head_now = head_commit(cwd)
    for name, outcome in finished.items():
        if outcome.tail:  # the reason it failed is known; DVC's log of it is empty or stale
            continue
        logs = dvc(["queue", "logs", name], cwd, check=False).stdout
        outcome.stages_run = STAGE_RE.findall(logs)
        outcome.tail = logs[-4000:]
        if outcome.ok and name not in held:
            outcome.ok = False
            # last, since the failure report prints the end of the tail
            outcome.tail += "\n" + not_held_reason(head_at_start, head_now)
    return [finished[e.id] for e in exps]
