"""The variant catalog: every experiment of the study as a named set of params overrides.

``catalog.yaml`` (repository root) names each experiment by its id (E0, E1, ... P6) and lists
its overrides in the syntax of ``dvc exp run -S`` (Hydra: ``key=value``, YAML-typed values).
This module

* loads and validates the catalog: each override must be a plain ``key=value`` on a key of the
  params schema, and params.yaml with an experiment's overrides applied must pass
  :func:`ccnf.config.parse_params` (errors name the experiment id and the key);
* applies overrides to a raw params dict exactly as ``dvc exp run -S`` does (same parser:
  Hydra's, which DVC uses; the tests compare with a real ``dvc exp run``);
* runs any subset through DVC's experiment machinery (``dvc exp run --temp`` one after the
  other, or ``dvc exp run --queue`` + ``dvc queue start -j N``), replacing an earlier
  experiment of the same name, and records the wall time;
* reads DVC's own experiment records (``dvc exp show --json``) back into rows for the
  comparison table (:mod:`ccnf.study_report` renders them).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccnf.config import Params, parse_params
from ccnf.errors import CcnfError
from ccnf.names import SCORES

CATALOG_FILE = Path("catalog.yaml")
PARAMS_FILE = "params.yaml"
SUMMARY_FILE = "metrics/summary.json"
SCORE_DEFS = SCORES
# a valid git ref component that is also easy to type: DVC stores experiments as git refs
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# DVC stage names that must never run in a catalog experiment (the features are shared)
SHARED_STAGES = ("synth", "prepare", "extract")


# ----------------------------------------------------------------------------- the file


class NoteFigure(BaseModel):
    """The research note's final averages on MVTec AD for the same variant (seeds/000)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="the note's name for the run")
    image_auroc: float = Field(ge=0, le=1)
    pixel_auroc: float = Field(ge=0, le=1)
    image_forgetting: float | None = Field(None, ge=-1, le=1)
    pixel_forgetting: float | None = Field(None, ge=-1, le=1)


class _EntryModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    note: NoteFigure | None = None


class _CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str
    ci_subset: list[str] = Field(default_factory=list)
    # named sets of experiments (e.g. the one benchmarks/industrial12.py runs on real images)
    subsets: dict[str, list[str]] = Field(default_factory=dict)
    # the experiments whose records the competence targets compare (study_report.TARGETS)
    targets: dict[str, str] = Field(default_factory=dict)
    experiments: dict[str, _EntryModel] = Field(min_length=1)


@dataclass(frozen=True)
class Experiment:
    """One catalog entry: an id, what it tests, its ``-S`` overrides, the note's figure."""

    id: str
    description: str
    overrides: tuple[str, ...]
    note: NoteFigure | None = None

    def set_args(self) -> list[str]:
        """The ``-S key=value`` arguments of ``dvc exp run`` for this experiment."""
        args: list[str] = []
        for o in self.overrides:
            args += ["-S", o]
        return args

    def dvc_command(self, *, queue: bool = False, temp: bool = False) -> list[str]:
        """``dvc exp run [--queue|--temp] -n ID -S k=v ...`` (as the user would type it)."""
        cmd = ["dvc", "exp", "run"]
        if queue:
            cmd.append("--queue")
        elif temp:
            cmd.append("--temp")
        return [*cmd, "-n", self.id, *self.set_args()]


@dataclass(frozen=True)
class Catalog:
    """The validated catalog file."""

    path: Path
    reference: str
    ci_subset: tuple[str, ...]
    experiments: dict[str, Experiment]
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return list(self.experiments)

    def select(self, ids: Sequence[str], *, all_: bool = False, ci: bool = False) -> list[
        Experiment
    ]:
        """The experiments named by ``ids`` (catalog order), all of them, or the CI subset."""
        wanted = self.ids if all_ else list(ids) + (list(self.ci_subset) if ci else [])
        if not wanted:
            raise CcnfError(
                "no experiment selected",
                where=str(self.path),
                fix="name experiment ids, or pass --all or --ci (ccnf catalog list shows them)",
            )
        unknown = [i for i in wanted if i not in self.experiments]
        if unknown:
            hints = [
                f"'{u}'" + (f" (did you mean '{m[0]}'?)" if (m := _close(u, self.ids)) else "")
                for u in unknown
            ]
            raise CcnfError(
                f"unknown experiment id {', '.join(hints)}",
                where=str(self.path),
                fix=f"use one of: {', '.join(self.ids)}",
            )
        chosen = set(wanted)
        return [e for i, e in self.experiments.items() if i in chosen]


def _close(word: str, options: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a repeated mapping key is an error, not 'last one wins'."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file, rejecting duplicate keys (which DVC's own parser also rejects)."""
    if not path.is_file():
        raise CcnfError(f"{what} not found: {path}", fix="run from the repository root")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise CcnfError(f"{what} is not valid YAML: {err}", where=str(path)) from None


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``, the value typed as ``dvc exp run -S`` types it.

    DVC hands ``-S`` strings to Hydra's override parser; so does this function. Only plain
    changes of existing keys are accepted: no ``+key`` (add), ``~key`` (delete) or sweeps
    (``a=1,2``), none of which belongs in a catalog entry.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        ov = OverridesParser.create().parse_override(text)
    except HydraException as err:
        raise CcnfError(
            f"override '{text}' is not valid `dvc exp run -S` syntax: {err}",
            fix="write key.subkey=value, e.g. loss.lambda_center=0.0",
        ) from None
    if ov.is_add() or ov.is_force_add() or ov.is_delete():
        raise CcnfError(
            f"override '{text}' adds or deletes a key",
            fix="catalog overrides change existing params.yaml keys only: write key=value",
        )
    if ov.is_sweep_override():
        raise CcnfError(
            f"override '{text}' is a sweep (several values)",
            fix="one value per key; make one catalog entry per value",
        )
    if ov.value_type is None:
        raise CcnfError(f"override '{text}' has no value", fix="write key=value")
    return ov.key_or_group, _plain(ov.value())


def _plain(value: Any) -> Any:
    """Hydra's parsed value as plain Python (lists/dicts recursively, strings as str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each ``key=value`` applied, as ``dvc exp run -S`` would.

    Dotted keys walk mappings; an integer part indexes a list (``data.classes.0=a``). A key
    that is not already there is an error (DVC: "Could not override"), never a silent addition.
    """
    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, dict):
                if part not in node:
                    hint = _close(part, [str(k) for k in node])
                    raise CcnfError(
                        f"override '{text}': params has no key '{here}'"
                        + (f" (did you mean '{'.'.join([*parts[:depth], hint[0]])}'?)"
                           if hint else ""),
                        fix="overrides change existing keys only (see params.yaml)",
                    )
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise CcnfError(
                        f"override '{text}': '{here}' is not an index of a list of "
                        f"{len(node)} items",
                        fix="index lists from 0: key.0=value",
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise CcnfError(
                    f"override '{text}': '{'.'.join(parts[:depth])}' is a value, not a section",
                    fix="override the key itself, not a sub-key of it",
                )
    return out


def schema_key_error(key: str) -> str | None:
    """Why ``key`` is not a key of the params schema (:class:`ccnf.config.Params`), or None."""
    model: type[BaseModel] = Params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            hint = _close(part, list(fields))
            where = f"'{prefix}'" if prefix else "params.yaml"
            msg = f"'{key}' is not a params key: {where} has no '{part}'"
            if hint:
                msg += f" (did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?)"
            return msg
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        # a leaf, or a free-form mapping/list (classes, tasks, out_indices, noise_sigmas):
        # anything below it is checked by parse_params on the applied result
        if depth < len(parts) - 1 and ann in (int, float, bool, str):
            return f"'{key}' goes below '{'.'.join(parts[: depth + 1])}', which is a value"
        return None
    return f"'{key}' names a whole section; override its keys one by one"


# ----------------------------------------------------------------------------- loading


def load_catalog(
    path: str | Path = CATALOG_FILE, params_path: str | Path = PARAMS_FILE
) -> Catalog:
    """Read and validate the catalog against the params schema and ``params_path``.

    Every problem is a :class:`CcnfError` that names the experiment id and the key.
    """
    path, params_path = Path(path), Path(params_path)
    raw = read_yaml(path, "catalog file")
    if not isinstance(raw, dict):
        raise CcnfError("the catalog must be a mapping", where=str(path),
                        fix="see catalog.yaml: reference, ci_subset, experiments")
    try:
        model = _CatalogModel.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"{loc}: {e['msg']}")
        raise CcnfError(
            "invalid catalog:\n  - " + "\n  - ".join(lines),
            where=str(path),
            fix="each experiment is {description: text, overrides: [key=value, ...], "
            "note: {label, image_auroc, pixel_auroc}}",
        ) from None

    base = read_yaml(params_path, "params file")
    if not isinstance(base, dict):
        raise CcnfError("params file must be a mapping of sections", where=str(params_path))
    experiments: dict[str, Experiment] = {}
    for exp_id, entry in model.experiments.items():
        where = f"{path}: experiments.{exp_id}"
        if not ID_PATTERN.match(exp_id) or exp_id.endswith(".lock") or ".." in exp_id:
            raise CcnfError(
                f"experiment id '{exp_id}' is not usable as a DVC experiment name",
                where=where,
                fix="use letters, digits, '-', '_' and '.', starting with a letter or digit",
            )
        keys: dict[str, str] = {}
        for text in entry.overrides:
            try:
                key, _ = parse_override(text)
            except CcnfError as err:
                raise CcnfError(err.what, where=where, fix=err.fix) from None
            if key in keys:
                raise CcnfError(
                    f"experiment '{exp_id}' sets '{key}' twice ('{keys[key]}', '{text}')",
                    where=where,
                    fix="keep one value per key",
                )
            keys[key] = text
            problem = schema_key_error(key)
            if problem:
                raise CcnfError(f"experiment '{exp_id}': {problem}", where=where,
                                fix="use a key of params.yaml (ccnf/config.py)")
        try:
            applied = apply_overrides(base, entry.overrides)
            parse_params(applied, f"{params_path} + catalog experiment '{exp_id}'")
        except CcnfError as err:
            raise CcnfError(
                f"experiment '{exp_id}': {err.what}",
                where=where,
                fix="correct the override(s) of this experiment",
            ) from None
        experiments[exp_id] = Experiment(exp_id, entry.description, tuple(entry.overrides),
                                         entry.note)

    if model.reference not in experiments:
        raise CcnfError(f"reference '{model.reference}' is not an experiment of the catalog",
                        where=f"{path}: reference", fix=f"use one of {', '.join(experiments)}")
    if experiments[model.reference].overrides:
        raise CcnfError(f"reference '{model.reference}' has overrides",
                        where=f"{path}: reference",
                        fix="the reference is params.yaml itself: give it overrides: []")
    named = {"ci_subset": model.ci_subset,
             **{f"subsets.{k}": v for k, v in model.subsets.items()},
             **{f"targets.{k}": [v] for k, v in model.targets.items()}}
    for where_key, ids in named.items():
        for i in ids:
            if i not in experiments:
                raise CcnfError(f"{where_key} names unknown experiment '{i}'",
                                where=f"{path}: {where_key}", fix=f"use ids of {path}")
    return Catalog(path, model.reference, tuple(model.ci_subset), experiments,
                   {k: tuple(v) for k, v in model.subsets.items()}, dict(model.targets))


# ----------------------------------------------------------------------------- DVC calls


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


def _stream(args: Sequence[str], cwd: Path, on_line: Callable[[str], None]) -> tuple[int, str]:
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
    wanted = {e.id for e in exps}
    rows = match_records(catalog, load_records(cwd, commits=1))
    return [
        r.exp.id for r in rows
        if r.exp.id in wanted and r.record is not None and r.record.kind == "experiment"
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
        rc, out = _stream(cmd, cwd, on_line)
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
    for name, outcome in finished.items():
        if outcome.tail:  # the reason it failed is known; DVC's log of it is empty or stale
            continue
        logs = dvc(["queue", "logs", name], cwd, check=False).stdout
        outcome.stages_run = STAGE_RE.findall(logs)
        outcome.tail = logs[-4000:]
        if outcome.ok and name not in held:
            outcome.ok = False
            outcome.tail = ("DVC reports success but holds no experiment of this name\n"
                            + outcome.tail)
    return [finished[e.id] for e in exps]


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ExpRecord:
    """One row of ``dvc exp show --json``: the workspace, a baseline commit or an experiment."""

    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    kind: str = "experiment"  # "workspace" | "baseline" | "experiment"
    baseline: str = ""  # the commit an experiment derives from (a baseline: its own rev)

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"


def parse_exp_show(data: list[dict[str, Any]]) -> list[ExpRecord]:
    """Flatten ``dvc exp show --json`` (DVC 3.x) into records, newest baseline commit first.

    Queued, running and failed experiments are skipped.
    """
    records: list[ExpRecord] = []

    def record(entry: dict[str, Any], name: str | None, kind: str, baseline: str) -> None:
        d = entry.get("data") or {}
        params = ((d.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
        metrics = ((d.get("metrics") or {}).get(SUMMARY_FILE) or {}).get("data") or {}
        records.append(ExpRecord(name or str(entry.get("rev", "?")), str(entry.get("rev", "")),
                                 params, metrics, kind, baseline))

    for commit in data:
        rev = str(commit.get("rev", ""))
        if rev == "workspace":
            record(commit, "workspace", "workspace", "")
            continue
        record(commit, commit.get("name"), "baseline", rev)
        for exp in commit.get("experiments") or []:
            executor = exp.get("executor") or {}
            if executor and executor.get("state") not in (None, "success"):
                continue
            revs = exp.get("revs") or []
            if revs:
                record(revs[0], exp.get("name"), "experiment", rev)
    return records


def load_records(cwd: Path, commits: int = 1, rev: str | None = None) -> list[ExpRecord]:
    """DVC's experiment records (``dvc exp show --json``) of the last ``commits`` commits.

    DVC files experiments under the commit they derive from and shows HEAD's by default, so
    committing anything after a catalog run (REPORT.md, say) would hide them; looking a few
    commits back finds them again (:func:`match_records` prefers the newest).
    """
    args = ["exp", "show", "--json", "--no-pager", "-n", str(max(1, commits))]
    if rev:
        args += ["--rev", rev]
    out = dvc(args, cwd).stdout
    try:
        data = json.loads(out)
    except json.JSONDecodeError as err:
        raise CcnfError(f"`dvc exp show --json` printed no JSON ({err})", where=str(cwd)) from None
    return parse_exp_show(data)


@dataclass(frozen=True)
class Row:
    """A catalog experiment and the record that holds its results (None: not run yet)."""

    exp: Experiment
    record: ExpRecord | None
    problem: str | None = None  # e.g. the record's params differ from the catalog's


def match_records(catalog: Catalog, records: Sequence[ExpRecord]) -> list[Row]:
    """One row per catalog experiment, with DVC's record of it.

    An experiment is found by name, on the newest baseline commit that has one of that name.
    Without one, the reference (no overrides) is the default study itself: the workspace when
    its params are the newest commit's (after ``dvc repro`` its metrics are the fresh ones),
    else that commit's record. A record whose params differ from its own baseline's params.yaml
    plus the catalog's overrides (a stale run, an edited catalog) is flagged.
    """
    baselines = [r for r in records if r.kind == "baseline"]
    head = baselines[0] if baselines else None
    base_params = {b.rev: b.params for b in baselines}
    workspace = next((r for r in records if r.kind == "workspace"), None)
    by_name: dict[str, ExpRecord] = {}
    for r in records:  # newest baseline first: keep the first of each name
        if r.kind == "experiment":
            by_name.setdefault(r.name, r)
    rows = []
    for exp in catalog.experiments.values():
        rec = by_name.get(exp.id)
        if rec is None and exp.id == catalog.reference:
            fresh = (workspace is not None and head is not None and workspace.metrics
                     and workspace.params == head.params)
            rec = workspace if fresh else head
        problem = None
        if rec is not None:
            params = base_params.get(rec.baseline) or (head.params if head else None)
            if params:
                problem = params_mismatch(params, exp, rec.params)
        rows.append(Row(exp, rec, problem))
    return rows


def record_baselines(rows: Sequence[Row]) -> list[str]:
    """The baseline commits the rows' records derive from, newest first (short SHAs)."""
    seen: list[str] = []
    for r in rows:
        if r.record is not None and r.record.baseline and r.record.baseline[:7] not in seen:
            seen.append(r.record.baseline[:7])
    return seen


def params_mismatch(base: dict[str, Any], exp: Experiment, got: dict[str, Any]) -> str | None:
    """Describe how ``got`` differs from ``base`` + the experiment's overrides (None: same)."""
    expected = apply_overrides(base, exp.overrides)
    diffs = _diff(expected, got, "")
    if not diffs:
        return None
    return "params differ from the catalog: " + "; ".join(diffs[:4]) + (
        f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"),
                         f"{prefix}.{k}" if prefix else str(k))
        return out
    if a != b:
        return [f"{prefix}: expected {a!r}, recorded {b!r}"]
    return []
