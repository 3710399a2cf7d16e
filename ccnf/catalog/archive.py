"""The catalog's records kept in the repository (``docs/report/<block>_records.json``).

DVC keeps experiments as git refs of the machine that ran them (``refs/exps``): a fresh clone,
CI or the next machine has none of them, and REPORT.md's tables could no longer be re-derived
or checked there. So every rendering of a table also writes the record behind each of its rows
(params, metrics, run time, the baseline commit and that commit's params.yaml) to this file,
and every command that reads records adds the archived ones to DVC's own (:func:`merge`): a
record of DVC's wins over an archived one of the same name unless that one is newer.

Plain JSON, read strictly: a file that is not exactly this layout is an error naming it, never
partly used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ccnf.atomic import write_json
from ccnf.catalog.records import ExpRecord, Row, load_records
from ccnf.errors import CcnfError

ARCHIVE_FORMAT = 1
_FIELDS: dict[str, type] = {"name": str, "rev": str, "kind": str, "baseline": str,
                            "timestamp": str, "params": dict, "metrics": dict}
_KINDS = ("baseline", "experiment")


def archive_rows(rows: Sequence[Row], records: Sequence[ExpRecord]) -> dict[str, Any]:
    """The archive of the rows' records: each as an experiment named by its catalog id (the
    reference row's too, whatever DVC called it), plus every baseline commit they derive from
    with its params (metrics left out: the rows carry their own)."""
    baselines = {r.rev: r for r in records if r.kind == "baseline"}
    head = next(iter(baselines), "")
    kept: list[dict[str, Any]] = []
    for row in rows:
        rec = row.record
        if rec is None:
            continue
        # a workspace's record has no commit; its params are the head commit's (it was fresh)
        base = rec.baseline or (rec.rev if rec.kind == "baseline" else head)
        kept.append(_entry(ExpRecord(row.exp.id, rec.rev, rec.params, rec.metrics,
                                     "experiment", base, rec.timestamp)))
    bases = sorted({e["baseline"] for e in kept if e["baseline"]})
    for rev in bases:
        if rev not in baselines:
            raise CcnfError(f"record of {rev} has no baseline commit among the records read",
                            fix="read more commits: --commits N")
        b = baselines[rev]
        kept.append(_entry(ExpRecord(b.name, b.rev, b.params, {}, "baseline", b.rev,
                                     b.timestamp)))
    return {"format": ARCHIVE_FORMAT,
            "about": "records behind REPORT.md's table (ccnf/catalog/archive.py)",
            "records": kept}


def _entry(rec: ExpRecord) -> dict[str, Any]:
    return {"name": rec.name, "rev": rec.rev, "kind": rec.kind, "baseline": rec.baseline,
            "timestamp": rec.timestamp, "params": rec.params, "metrics": rec.metrics}


def save_archive(path: Path, rows: Sequence[Row], records: Sequence[ExpRecord]) -> Path:
    """Write the rows' archive to ``path`` atomically."""
    return write_json(path, archive_rows(rows, records))


def load_archive(path: Path) -> list[ExpRecord]:
    """The archived records of ``path`` ([] when there is no such file), baselines newest
    first; anything but the exact layout is a :class:`CcnfError` naming the file."""
    if not path.is_file():
        return []
    fix = (f"git checkout {path} (or delete it: the next `ccnf catalog report` writes it "
           "again from the records DVC holds)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CcnfError(f"cannot read the record archive {path}: {err}", where=str(path),
                        fix=fix) from None
    if not isinstance(data, dict) or data.get("format") != ARCHIVE_FORMAT \
            or not isinstance(data.get("records"), list):
        raise CcnfError(f"{path} is not a record archive of format {ARCHIVE_FORMAT}",
                        where=str(path), fix=fix)
    out: list[ExpRecord] = []
    for i, entry in enumerate(data["records"]):
        bad = _problem(entry)
        if bad:
            raise CcnfError(f"{path}: record {i} {bad}", where=str(path), fix=fix)
        out.append(ExpRecord(entry["name"], entry["rev"], entry["params"], entry["metrics"],
                             entry["kind"], entry["baseline"], entry["timestamp"]))
    baselines = sorted((r for r in out if r.kind == "baseline"), key=lambda r: r.timestamp,
                       reverse=True)
    return baselines + [r for r in out if r.kind != "baseline"]


def _problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    if set(entry) != set(_FIELDS):
        return f"has keys {sorted(entry)}, expected {sorted(_FIELDS)}"
    for key, kind in _FIELDS.items():
        if not isinstance(entry[key], kind):
            return f"has {key} of type {type(entry[key]).__name__}, expected {kind.__name__}"
    if entry["kind"] not in _KINDS:
        return f"has kind {entry['kind']!r}, expected one of {_KINDS}"
    return None


def merge(live: Sequence[ExpRecord], archived: Sequence[ExpRecord]) -> list[ExpRecord]:
    """DVC's records followed by the archived ones it lacks: an archived baseline whose commit
    DVC did not list, an archived experiment whose name DVC has no record of; one DVC has too
    replaces DVC's newest record of that name only when its timestamp is later (ISO times;
    an unknown time never wins). DVC's head commit stays the first baseline."""
    out = list(live)
    revs = {r.rev for r in live if r.kind == "baseline"}
    first_of: dict[str, int] = {}
    for i, r in enumerate(live):
        if r.kind == "experiment":
            first_of.setdefault(r.name, i)
    for rec in archived:
        if rec.kind == "baseline":
            if rec.rev not in revs:
                out.append(rec)
                revs.add(rec.rev)
            continue
        i = first_of.get(rec.name)
        if i is None:
            first_of[rec.name] = len(out)
            out.append(rec)
        elif rec.timestamp and out[i].timestamp and rec.timestamp > out[i].timestamp:
            out[i] = rec
    return out


def rows_to_show(rows: Sequence[Row], always: Iterable[str],
                 archived: Sequence[ExpRecord]) -> list[Row]:
    """The rows of a named-set table (benchmarks/industrial12.py): those whose ids are in
    ``always`` (the set, the ids named on the command line, the reference) and every row the
    archive already holds a record of, so a run that names a few new rows keeps the others in
    the table and in the archive it rewrites."""
    shown = set(always) | {r.name for r in archived if r.kind == "experiment"}
    return [r for r in rows if r.exp.id in shown]


def load_with_archive(cwd: Path, commits: int, archive: Path) -> list[ExpRecord]:
    """DVC's records of the last ``commits`` commits in ``cwd``, merged with ``archive``'s."""
    return merge(load_records(cwd, commits), load_archive(archive))
