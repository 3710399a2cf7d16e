"""DVC's own experiment records (``dvc exp show --json``) read back into one :class:`Row` per
catalog experiment, for the comparison table (:mod:`ccnf.study_report` renders them), with
a check that each record's params are the catalog's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ccnf.catalog.commands import dvc
from ccnf.catalog.overrides import locate, parse_override
from ccnf.catalog.schema import PARAMS_FILE, Catalog, Experiment
from ccnf.config import NO_DEFAULT, schema_default
from ccnf.errors import CcnfError
from ccnf.names import SCORES

SUMMARY_FILE = "metrics/summary.json"
SCORE_DEFS = SCORES
MISSING_KEY = "<missing>"


@dataclass(frozen=True)
class ExpRecord:
    """One row of ``dvc exp show --json``: the workspace, a baseline commit or an experiment."""

    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    kind: str = "experiment"  # "workspace" | "baseline" | "experiment"
    baseline: str = ""  # the commit an experiment derives from (a baseline: its own rev)
    timestamp: str = ""  # DVC's ISO time of the run (a baseline: of its commit); "" unknown

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
                                 params, metrics, kind, baseline,
                                 str(d.get("timestamp") or "")))

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
    commits back finds them again (:func:`match_records` prefers the newest). The commits are
    git's last ``commits`` ancestors of HEAD in date order, merge parents included.
    """
    args = ["exp", "show", "--json", "--no-pager", "-n", str(max(1, commits))]
    if rev:
        args += ["--rev", rev]
    else:
        # every commit among the last ``commits``, merged branches included (``-n`` alone
        # follows first parents, so a catalog clone's commit merged back would be missed)
        listed = subprocess.run(["git", "rev-list", f"--max-count={max(1, commits)}", "HEAD"],
                                cwd=cwd, capture_output=True, text=True)
        revs = listed.stdout.split() if listed.returncode == 0 else []
        if revs:
            args = ["exp", "show", "--json", "--no-pager", "-n", "1"]
            for r in revs:
                args += ["--rev", r]
    return _exp_show(cwd, args)


def _exp_show(cwd: Path, args: list[str]) -> list[ExpRecord]:
    """``dvc ARGS`` (an ``exp show --json``) in ``cwd``, parsed into records."""
    try:
        data = json.loads(dvc(args, cwd).stdout)
    except json.JSONDecodeError as err:
        raise CcnfError(f"`dvc exp show --json` printed no JSON ({err})", where=str(cwd)) from None
    return parse_exp_show(data)


def off_history_records(cwd: Path, have: Sequence[ExpRecord]) -> list[ExpRecord]:
    """The experiments of ``cwd`` filed under commits that ``have`` does not list (DVC keeps
    them under ``refs/exps/<baseline>/<name>``), baselines newest first, each after its
    experiments' baseline: e.g. a clone reset to a newer commit of the repository it runs,
    whose earlier commit is no longer an ancestor of HEAD. [] when there are none."""
    listed = {r.rev for r in have if r.kind == "baseline"}
    refs = subprocess.run(["git", "for-each-ref", "refs/exps", "--format=%(refname)"],
                          cwd=cwd, capture_output=True, text=True)
    found: set[str] = set()
    for ref in refs.stdout.split():
        parts = ref.split("/")  # refs/exps/<2 hex>/<38 hex>/<name>
        if len(parts) >= 5 and len(parts[2] + parts[3]) == 40:
            found.add(parts[2] + parts[3])
    extra = sorted(found - listed)
    if not extra:
        return []
    stamps = subprocess.run(["git", "show", "-s", "--format=%H %ct", *extra], cwd=cwd,
                            capture_output=True, text=True)
    when = dict(line.split() for line in stamps.stdout.splitlines() if line.count(" ") == 1)
    extra = sorted((r for r in extra if r in when), key=lambda r: int(when[r]), reverse=True)
    args = ["exp", "show", "--json", "--no-pager", "-n", "1"]
    for rev in extra:
        args += ["--rev", rev]
    return [r for r in _exp_show(cwd, args) if r.kind != "workspace"]


@dataclass(frozen=True)
class Row:
    """A catalog experiment and the record that holds its results (None: not run yet)."""

    exp: Experiment
    record: ExpRecord | None
    problem: str | None = None  # e.g. the record's params differ from the catalog's
    # how the record's params differ from today's params.yaml plus the overrides, for a record
    # made on an earlier commit whose defaults have changed since (None: same params)
    earlier_defaults: str | None = None


def match_records(catalog: Catalog, records: Sequence[ExpRecord]) -> list[Row]:
    """One row per catalog experiment, with DVC's record of it.

    An experiment is found by name, on the newest baseline commit that has one of that name.
    The reference (no overrides) is the default study itself: the workspace when its params
    are the newest commit's (after ``dvc repro`` its metrics are the fresh ones), else that
    commit's record when it has results (a run named after the reference on an older commit
    may predate a changed default), else the newest run of that name. A record whose params
    differ from its own baseline's params.yaml plus the catalog's overrides (a stale run, an
    edited catalog) is flagged as a problem; one that matches its baseline but not the newest
    commit's params.yaml (a default changed after it was run) carries the difference in
    ``earlier_defaults``.
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
        if exp.id == catalog.reference:
            # the default study itself: the fresh workspace, else the newest commit's own
            # (committed) results, which are newer than any run named after the reference
            fresh = (workspace is not None and head is not None and workspace.metrics
                     and workspace.params == head.params)
            if fresh:
                rec = workspace
            elif head is not None and (head.metrics or rec is None):
                rec = head
        problem = earlier = None
        if rec is not None:
            params = base_params.get(rec.baseline) or (head.params if head else None)
            if params:
                problem = params_mismatch(params, exp, rec.params)
            if problem is None and head is not None and rec.baseline not in ("", head.rev):
                earlier = defaults_changed(head.params, exp, rec.params)
        rows.append(Row(exp, rec, problem, earlier))
    return rows


def defaults_changed(today: dict[str, Any], exp: Experiment, got: dict[str, Any]) -> str | None:
    """How a record's params ``got`` differ from ``today``'s params.yaml plus the experiment's
    overrides, as "key: now X, then Y" (None: the same).

    A key the record lacks (an option added after it ran) meant its schema default
    (:func:`ccnf.config.schema_default`: what today's code reads for an absent key, and the
    behaviour from before the option existed); it is listed only when today's value differs.
    """
    diffs = []
    for key, now, then in _differences(exp.expected_params(today), got, ""):
        if then == MISSING_KEY:
            default = schema_default(key)
            if default is NO_DEFAULT or default == now:
                continue
            then = f"absent ({default!r} by default)"
        else:
            then = repr(then)
        diffs.append(f"{key}: now {now!r}, then {then}")
    return "; ".join(diffs) or None


def record_baselines(rows: Sequence[Row]) -> list[str]:
    """The baseline commits the rows' records derive from, newest first (short SHAs)."""
    seen: list[str] = []
    for r in rows:
        if r.record is not None and r.record.baseline and r.record.baseline[:7] not in seen:
            seen.append(r.record.baseline[:7])
    return seen


def as_of(base: dict[str, Any], exp: Experiment) -> tuple[Experiment, list[str]]:
    """``exp`` as it applies to ``base``, an older params.yaml: an override of a key that did
    not exist yet, set to that key's schema default, asks for what the older code did anyway
    and is dropped (e.g. a row pinning ``flow.class_norm_mean=channel`` after ``position``
    became the default); one set to anything else could not have run there and is returned
    in the second list."""
    kept, impossible = [], []
    for text in exp.overrides:
        key, value = parse_override(text)
        try:
            locate(base, key, text)
        except CcnfError:
            default = schema_default(key)
            if default is NO_DEFAULT or default != value:
                impossible.append(text)
        else:
            kept.append(text)
    return replace(exp, overrides=tuple(kept)), impossible


def params_mismatch(base: dict[str, Any], exp: Experiment, got: dict[str, Any]) -> str | None:
    """Describe how ``got`` differs from ``base`` + the experiment's overrides (None: same).
    ``base`` may be an older params.yaml than the catalog's (:func:`as_of`)."""
    exp, impossible = as_of(base, exp)
    if impossible:
        return ("the catalog's overrides " + ", ".join(impossible) + " name keys its commit's "
                "params.yaml did not have: run it again (ccnf catalog run " + exp.id + ")")
    diffs = [f"{key}: expected {want!r}, recorded {then!r}"
             for key, want, then in _differences(exp.expected_params(base), got, "")]
    if not diffs:
        return None
    return "params differ from the catalog: " + "; ".join(diffs[:4]) + (
        f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")


def _differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, MISSING_KEY), b.get(k, MISSING_KEY),
                                f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, a, b)] if a != b else []
