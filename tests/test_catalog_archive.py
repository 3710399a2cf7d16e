"""The record archive beside REPORT.md: a fresh clone without DVC's experiment refs renders
and checks the same table; the archive is read strictly and loses to newer runs."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO

from ccnf.catalog import ExpRecord, load_catalog, match_records, parse_exp_show
from ccnf.catalog.archive import archive_rows, load_archive, merge, rows_to_show, save_archive
from ccnf.errors import CcnfError
from ccnf.study_report import check_report, table_block, write_report

SAMPLE = Path(__file__).parent / "data" / "exp_show_sample.json"


@pytest.fixture
def sample() -> list[dict]:
    return json.loads(SAMPLE.read_text())


@pytest.fixture
def catalog():
    return load_catalog(REPO / "catalog.yaml", REPO / "params.yaml")


def _fresh_clone_head(sample: list[dict]) -> list[ExpRecord]:
    """What DVC shows in a fresh clone one commit later: the new head commit (same params,
    its committed metrics), no experiments."""
    head = copy.deepcopy(sample[1])
    head["rev"] = head["data"]["rev"] = "f" * 40
    head["data"]["timestamp"] = "2026-11-24T10:00:00"
    head["experiments"] = None
    return parse_exp_show([head])


def test_a_fresh_clone_renders_and_checks_the_same_table_from_the_archive(
        sample, catalog, tmp_path) -> None:
    records = parse_exp_show(sample)
    rows = match_records(catalog, records)
    archive = save_archive(tmp_path / "catalog_records.json", rows, records)
    report = tmp_path / "REPORT.md"
    write_report(rows, catalog.reference, report, tmp_path, tmp_path / "t.json",
                 make_plots=False)

    live = _fresh_clone_head(sample)
    without = {r.exp.id: r for r in match_records(catalog, live)}
    assert without["E0"].record is None  # what a fresh clone had before the archive
    again = match_records(catalog, merge(live, load_archive(archive)))
    by_id = {r.exp.id: r for r in again}
    for exp_id in ("E0", "E9-cal", "S-oracle"):
        rec = by_id[exp_id].record
        assert rec is not None and by_id[exp_id].problem is None, exp_id
        assert rec.baseline == sample[1]["rev"]  # still filed under the commit it ran on
        assert rec.metrics == next(r for r in records if r.name == exp_id).metrics
    assert check_report(again, catalog.reference, report, 0.0) == []  # every number
    assert "from commits fffffff, 8707f78" in table_block(again, catalog.reference)


def test_the_archive_holds_each_row_once_with_its_baseline_params(sample, catalog) -> None:
    records = parse_exp_show(sample)
    data = archive_rows(match_records(catalog, records), records)
    kinds = [(e["kind"], e["name"]) for e in data["records"]]
    names = [n for k, n in kinds if k == "experiment"]
    assert sorted(names) == sorted({"E0", "E9-cal", "S-oracle", catalog.reference})
    baselines = [e for e in data["records"] if e["kind"] == "baseline"]
    assert [b["rev"] for b in baselines] == [sample[1]["rev"]]
    assert baselines[0]["params"] == records[1].params and baselines[0]["metrics"] == {}
    json.dumps(data, allow_nan=False)  # plain JSON


def _exp(name: str, ts: str, value: float, base: str = "b1") -> ExpRecord:
    return ExpRecord(name, f"r-{name}-{ts}", {}, {"v": value}, "experiment", base, ts)


def test_merge_prefers_the_newer_run_and_never_an_unknown_time() -> None:
    head = ExpRecord("head", "b2", {"a": 1}, {}, "baseline", "b2", "2026-11-30T08:00:00")
    live = [head, _exp("A", "2026-11-30T09:00:00", 1.0, "b2"),
            _exp("B", "2026-11-29T09:00:00", 1.0)]
    archived = [
        ExpRecord("old", "b1", {"a": 0}, {}, "baseline", "b1", "2026-11-29T08:00:00"),
        ExpRecord("head", "b2", {"a": 9}, {}, "baseline", "b2", "2026-11-30T08:00:00"),
        _exp("A", "2026-11-29T09:00:00", 2.0),  # older than DVC's: DVC's stays
        _exp("B", "2026-11-30T10:00:00", 2.0),  # newer: replaces DVC's
        _exp("C", "", 2.0),  # only archived: added
    ]
    merged = merge(live, archived)
    got = {r.name: r.metrics.get("v") for r in merged if r.kind == "experiment"}
    assert got == {"A": 1.0, "B": 2.0, "C": 2.0}
    bases = [r for r in merged if r.kind == "baseline"]
    assert [b.rev for b in bases] == ["b2", "b1"] and bases[0].params == {"a": 1}
    unknown = merge([_exp("D", "", 1.0)], [_exp("D", "2026-11-30T10:00:00", 2.0)])
    assert [r.metrics["v"] for r in unknown] == [1.0]


@pytest.mark.parametrize("content, says", [
    ("{", "cannot read the record archive"),
    ('{"format": 2, "records": []}', "not a record archive of format 1"),
    ('{"format": 1, "records": [3]}', "record 0 is not an object"),
    ('{"format": 1, "records": [{"name": "x"}]}', "record 0 has keys ['name']"),
])
def test_a_malformed_archive_is_an_error_naming_the_file(tmp_path, content, says) -> None:
    path = tmp_path / "catalog_records.json"
    path.write_text(content)
    with pytest.raises(CcnfError) as err:
        load_archive(path)
    assert says in str(err.value) and str(path) in str(err.value)
    assert "git checkout" in str(err.value)


def test_a_wrong_type_or_kind_is_refused_and_no_file_is_no_records(tmp_path) -> None:
    entry = {"name": "E0", "rev": "r", "kind": "experiment", "baseline": "b",
             "timestamp": "", "params": {}, "metrics": {}}
    path = tmp_path / "a.json"
    for key, bad, says in (("metrics", [], "metrics of type list"),
                           ("kind", "workspace", "kind 'workspace'")):
        path.write_text(json.dumps({"format": 1, "records": [{**entry, key: bad}]}))
        with pytest.raises(CcnfError, match=says):
            load_archive(path)
    path.write_text(json.dumps({"format": 1, "records": [entry]}))
    assert load_archive(path) == [ExpRecord("E0", "r", {}, {}, "experiment", "b", "")]
    assert load_archive(tmp_path / "absent.json") == []


def test_repository_archives_are_readable() -> None:
    for path in sorted((REPO / "docs" / "report").glob("*_records.json")):
        assert load_archive(path), path


def test_a_reference_row_from_the_workspace_is_filed_under_the_head_commit(
        sample, catalog) -> None:
    records = parse_exp_show(sample)
    rows = match_records(catalog, records)
    ref = next(r for r in rows if r.exp.id == catalog.reference)
    assert ref.record is not None
    ws = replace(ref, record=replace(ref.record, kind="workspace", baseline="", rev="workspace"))
    data = archive_rows([ws], records)
    exp = next(e for e in data["records"] if e["kind"] == "experiment")
    assert exp["name"] == catalog.reference and exp["baseline"] == sample[1]["rev"]


def test_experiments_of_commits_off_the_history_are_found(tmp_path, monkeypatch) -> None:
    """A clone reset to a newer commit keeps its earlier experiments under refs/exps: they are
    read by their baseline, newest first, and a baseline already listed is not read again."""
    import subprocess

    from ccnf.catalog import records as rec_mod

    def git(*args: str, date: str = "2026-11-01T00:00:00") -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin",
               "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    revs = []
    for i, date in enumerate(("2026-11-01T00:00:00", "2026-11-02T00:00:00",
                              "2026-11-03T00:00:00")):  # commit order = date order
        (tmp_path / "f").write_text(str(i))
        git("add", "f")
        git("commit", "-q", "-m", str(i), date=date)
        revs.append(git("rev-parse", "HEAD"))
    old, older, head = revs[1], revs[0], revs[2]
    for base, name in ((older, "A"), (old, "B"), (head, "C")):
        git("update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", base)
    seen: list[list[str]] = []

    def fake_dvc(args, cwd, **kw):
        seen.append(list(args))
        data = [{"rev": r, "name": None, "data": {"rev": r, "timestamp": "t", "params": {},
                                                  "metrics": {}},
                 "experiments": [{"name": "X", "revs": [{"rev": "e" + r[:6], "data": {}}]}]}
                for r in args[args.index("--rev") + 1::2]]
        return subprocess.CompletedProcess(args, 0, json.dumps(data), "")

    monkeypatch.setattr(rec_mod, "dvc", fake_dvc)
    have = [ExpRecord(head, head, {}, {}, "baseline", head)]
    got = rec_mod.off_history_records(tmp_path, have)
    assert seen and [a for a in seen[0] if len(a) == 40] == [old, older]  # newest first
    assert [(r.kind, r.baseline) for r in got] == [
        ("baseline", old), ("experiment", old), ("baseline", older), ("experiment", older)]
    assert rec_mod.off_history_records(tmp_path, have + got) == []


def test_a_named_set_table_keeps_every_row_the_archive_holds(sample, catalog) -> None:
    """benchmarks/industrial12.py with a few ids: the rows archived by earlier runs stay in
    the table (and so in the archive it rewrites); rows neither named nor archived do not
    appear."""
    records = parse_exp_show(sample)
    rows = match_records(catalog, records)
    archived = [r for r in records if r.kind == "baseline" or r.name in ("E0", "E9-cal")]
    shown = {r.exp.id for r in rows_to_show(rows, {"S-oracle"}, archived)}
    assert shown == {"S-oracle", "E0", "E9-cal"}
    assert {r.exp.id for r in rows_to_show(rows, {"S-oracle"}, [])} == {"S-oracle"}
