"""REPORT.md: tables from DVC's experiment records, regeneration, and the CI check."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO

from ccnf.catalog import load_catalog, match_records, parse_exp_show
from ccnf.errors import CcnfError
from ccnf.study_report import (
    METRIC_COLUMNS,
    check_report,
    compare_tables,
    get_block,
    parse_tables,
    plots_block,
    table_block,
    timing_block,
    write_report,
)

# `dvc exp show --json` of a real catalog run (DVC 3.67; the default study as the baseline
# commit and the workspace, plus `ccnf catalog run E0 E9-cal S-oracle`), each record trimmed to
# rev, name, params and metrics (deps/outs dropped); the values are as DVC printed them
SAMPLE = Path(__file__).parent / "data" / "exp_show_sample.json"


@pytest.fixture
def sample() -> list[dict]:
    return json.loads(SAMPLE.read_text())


def _rows(sample: list[dict]):
    cat = load_catalog(REPO / "catalog.yaml", REPO / "params.yaml")
    return cat, match_records(cat, parse_exp_show(sample))


def _line(block: str, title_start: str, exp_id: str) -> list[str]:
    for row in parse_tables(block):
        if row.table.startswith(title_start) and row.exp_id == exp_id:
            return list(row.cells)
    raise AssertionError(f"no row {exp_id} in {title_start}")


def _summary(sample: list[dict], name: str) -> dict:
    for commit in sample:
        if commit.get("rev") == "workspace":
            continue
        if name == "baseline":
            return commit["data"]["metrics"]["metrics/summary.json"]["data"]
        for exp in commit.get("experiments") or []:
            if exp["name"] == name:
                return exp["revs"][0]["data"]["metrics"]["metrics/summary.json"]["data"]
    raise AssertionError(name)


def test_sample_is_a_real_record_of_catalog_experiments(sample) -> None:
    records = parse_exp_show(sample)
    names = {r.name for r in records if r.kind == "experiment"}
    assert {"E0", "E9-cal", "S-oracle"} <= names
    _, rows = _rows(sample)
    by_id = {r.exp.id: r for r in rows}
    for exp_id in ("E0", "E9-cal", "S-oracle", "E11"):
        assert by_id[exp_id].record is not None and by_id[exp_id].problem is None, exp_id
    # the reference is the default study: the workspace row (fresh after dvc repro)
    assert by_id["E11"].record.kind in ("workspace", "baseline")


def test_table_renders_every_score_definition_from_the_records(sample) -> None:
    cat, rows = _rows(sample)
    block = table_block(rows, cat.reference)
    e0 = _summary(sample, "E0")
    for score in ("nf", "proto", "hybrid"):
        cells = _line(block, score, "E0")
        # every column is the record's figure, or missing where this record has none
        assert cells == [f"{e0[score][k]:.4f}" if k in e0[score] else "—"
                         for k, _ in METRIC_COLUMNS]
        assert cells[:5] != ["—"] * 5
        assert _line(block, score, "E7") == ["—"] * len(METRIC_COLUMNS)  # not run
    base = _summary(sample, "baseline")
    assert _line(block, "nf", "E11")[0] == f"{base['nf']['image_auroc']:.4f}"
    sel = _line(block, "class selection", "E0")
    assert sel[4] == f"{e0['nf']['image_auroc']:.4f}"
    assert sel[6:] == ["0.6811", "0.8360"]  # the note's MVTec figure next to ours
    assert "not run:" in block and "E7" in block.split("not run:")[1]


def test_agnostic_and_class_selection_are_shown_when_recorded(sample) -> None:
    cat, rows = _rows(sample)
    had = "class_select" in _summary(sample, "E0")
    block = table_block(rows, cat.reference)
    if not had:  # this pipeline version did not report them yet: shown as missing
        assert _line(block, "class selection", "E0")[:4] == ["—"] * 4
    e0 = next(r for r in rows if r.exp.id == "E0")
    metrics = copy.deepcopy(e0.record.metrics)
    metrics["class_select"] = {"method": "likelihood", "accuracy": 0.8125}
    metrics["agnostic"] = {"nf": {"image_auroc": 0.61, "pixel_auroc": 0.72}}
    rows = [replace(r, record=replace(r.record, metrics=metrics)) if r.exp.id == "E0" else r
            for r in rows]
    cells = _line(table_block(rows, cat.reference), "class selection", "E0")
    assert cells[:4] == ["likelihood", "0.8125", "0.6100", "0.7200"]


def test_check_passes_on_regenerated_report_and_catches_a_changed_number(sample,
                                                                         tmp_path) -> None:
    cat, rows = _rows(sample)
    report = tmp_path / "REPORT.md"
    write_report(rows, cat.reference, report, tmp_path / "plots", tmp_path / "t.json",
                 make_plots=False)
    assert check_report(rows, cat.reference, report, 0.002) == []
    value = _line(get_block(report.read_text(), "catalog-table", report), "nf", "E0")[1]
    line_old = next(ln for ln in report.read_text().splitlines() if ln.startswith("| E0 |"))

    def edit(new: str) -> None:
        text = report.read_text()
        report.write_text(text.replace(line_old, line_old.replace(value, new, 1), 1))

    edit(f"{float(value) + 0.01:.4f}")
    problems = check_report(rows, cat.reference, report, 0.002)
    assert len(problems) == 1
    assert problems[0].startswith("nf / E0 / pixel AUROC: REPORT.md")
    # only the CI subset is compared: a difference elsewhere does not count
    assert check_report(rows, cat.reference, report, 0.002, ["E9-cal", "E11"]) == []
    assert len(check_report(rows, cat.reference, report, 0.002, ["E0"])) == 1
    line_old = next(ln for ln in report.read_text().splitlines() if ln.startswith("| E0 |"))
    value, new = f"{float(value) + 0.01:.4f}", f"{float(value) + 0.001:.4f}"
    edit(new)  # within tolerance
    assert check_report(rows, cat.reference, report, 0.002) == []
    assert len(check_report(rows, cat.reference, report, 0.0)) == 1


def test_check_flags_a_missing_run_and_a_stale_record(sample, tmp_path) -> None:
    cat, rows = _rows(sample)
    report = tmp_path / "REPORT.md"
    write_report(rows, cat.reference, report, tmp_path, tmp_path / "t.json", make_plots=False)
    without_e0 = [replace(r, record=None) if r.exp.id == "E0" else r for r in rows]
    problems = check_report(without_e0, cat.reference, report, 0.002, ["E0"])
    assert any("REPORT.md" in p and "vs fresh '—'" in p for p in problems)
    records = parse_exp_show(sample)
    e0 = next(r for r in records if r.name == "E0")
    params = copy.deepcopy(e0.params)
    params["loss"]["lambda_center"] = 0.5  # the record is not what the catalog says
    stale = match_records(cat, [replace(r, params=params) if r is e0 else r for r in records])
    problems = check_report(stale, cat.reference, report, 0.002, ["E0"])
    assert any("loss.lambda_center: expected 0.0, recorded 0.5" in p for p in problems)


def test_regeneration_rewrites_only_the_marked_blocks(sample, tmp_path) -> None:
    cat, rows = _rows(sample)
    report = tmp_path / "REPORT.md"
    timing = tmp_path / "timing.json"
    timing.write_text(json.dumps({
        "mode": "temp", "jobs": 1, "wall_s": 1234.5, "cpus": 2, "date": "2026-01-01",
        "commit": "abcdef0123", "load_avg_start": 1.0,
        "experiments": {"E0": {"seconds": 80.2, "stages_run": [
            "train@t0", "train@t1", "evaluate@t0", "evaluate@t1", "aggregate"], "ok": True}},
    }))
    plots = write_report(rows, cat.reference, report, tmp_path / "docs" / "report", timing)
    assert [p.name for p in plots] == ["forgetting.png", "scores.png", "image_vs_pixel.png"]
    assert all(p.stat().st_size > 5000 for p in plots)
    text = report.read_text()
    assert "](docs/report/forgetting.png)" in text
    assert "**20.6 min**" in text and "| E0 | 80 | train@t0..t1, evaluate@t0..t1, aggregate |" \
        in text and "none (features extracted once)" in text
    reading = "Our reading: E6 forgets least.\n"
    report.write_text(text.replace("(Hand-written;", reading + "(Hand-written;"))
    write_report(rows, cat.reference, report, tmp_path / "docs" / "report", timing,
                 make_plots=False)
    again = report.read_text()
    assert reading in again and again.count("<!-- catalog-table:begin -->") == 1
    report.write_text(again.replace("<!-- catalog-table:end -->", ""))
    with pytest.raises(CcnfError, match="catalog-table"):
        check_report(rows, cat.reference, report, 0.002)


def test_compare_tables_reports_column_and_row_changes() -> None:
    a = "#### nf: x\n\n| experiment | image AUROC |\n|---|---:|\n| E0 | 0.5000 |\n"
    assert compare_tables(a, a, 0.0) == []
    assert compare_tables(a, a.replace("image AUROC", "AUROC"), 0.1)[0].startswith(
        "nf: columns differ")
    assert "not in REPORT.md" in compare_tables(a, a + "| E1 | 0.1 |\n", 0.1)[0]
    assert "not in the catalog any more" in compare_tables(a + "| E1 | 0.1 |\n", a, 0.1)[0]


def test_timing_block_without_a_measurement() -> None:
    assert "Not measured yet" in timing_block(None)


def test_records_of_an_older_baseline_are_found_newest_first(sample) -> None:
    """Committing REPORT.md after a catalog run moves HEAD: the runs stay findable."""
    cat, _ = _rows(sample)
    commit = next(c for c in sample if c["rev"] != "workspace")
    older = copy.deepcopy(commit)
    older["rev"] = "0" * 40
    for exp in older["experiments"]:
        exp["revs"][0]["data"]["metrics"]["metrics/summary.json"]["data"]["nf"][
            "image_auroc"] = 0.123
    newer = copy.deepcopy(commit)
    newer["rev"], newer["experiments"] = "f" * 40, None  # e.g. the commit of REPORT.md
    data = [sample[0], newer, commit, older]
    rows = {r.exp.id: r for r in match_records(cat, parse_exp_show(data))}
    assert rows["E0"].record.baseline == commit["rev"]  # the newest that has E0, not the older
    assert rows["E0"].record.metrics["nf"]["image_auroc"] != 0.123
    assert rows["E0"].problem is None
    block = table_block(list(rows.values()), cat.reference)
    assert f"experiments derived from commit {commit['rev'][:7]}" in block


def test_records_made_under_earlier_defaults_are_marked_with_the_change(sample) -> None:
    """A record that matches its own commit's params.yaml but not today's (a default changed
    since) is listed with the change; an option merely added since is not a change."""
    cat, _ = _rows(sample)
    commit = next(c for c in sample if c["rev"] != "workspace")
    newer = copy.deepcopy(commit)
    newer["rev"], newer["experiments"] = "f" * 40, None
    today = newer["data"]["params"]["params.yaml"]["data"]
    today["loss"]["lambda_mi"] = 0.25  # a default changed after the runs
    today["train"]["a_new_option"] = 7  # an option added after the runs (no schema field)
    # an option added after the runs whose value today is not its schema default: the runs
    # meant the default (what an absent key reads as), so it is listed
    assert "class_norm_mean" not in commit["data"]["params"]["params.yaml"]["data"]["flow"]
    today["flow"]["class_norm_mean"] = "position"
    rows = {r.exp.id: r for r in match_records(cat, parse_exp_show([newer, commit]))}
    assert rows["E0"].record.baseline == commit["rev"] and rows["E0"].problem is None
    then = commit["data"]["params"]["params.yaml"]["data"]["loss"]["lambda_mi"]
    assert rows["E0"].earlier_defaults == (
        "flow.class_norm_mean: now 'position', then absent ('channel' by default); "
        f"loss.lambda_mi: now 0.25, then {then!r}")
    block = table_block(list(rows.values()), cat.reference)
    assert "Records made under earlier defaults" in block
    assert f"({commit['rev'][:7]}): flow.class_norm_mean" in block
    assert "a_new_option" not in block
    today["flow"]["class_norm_mean"] = "channel"  # today's value is the default: not listed
    rows = {r.exp.id: r for r in match_records(cat, parse_exp_show([newer, commit]))}
    assert rows["E0"].earlier_defaults == f"loss.lambda_mi: now 0.25, then {then!r}"
    same = {r.exp.id: r for r in match_records(cat, parse_exp_show([commit]))}
    assert same["E0"].earlier_defaults is None
    assert "earlier defaults" not in table_block(list(same.values()), cat.reference)


def test_the_reference_is_the_newest_default_study_not_an_older_run_of_its_name(sample) -> None:
    """A run named after the reference (E11) on an older commit predates whatever default
    changed since: the newest commit's own results are the reference row (and a fresh
    workspace, after dvc repro, before both)."""
    cat, _ = _rows(sample)
    head = next(c for c in sample if c["rev"] != "workspace")
    older = copy.deepcopy(head)
    older["rev"] = "a" * 40
    run = older["experiments"][0]
    run["name"] = run["revs"][0]["name"] = cat.reference
    stale = copy.deepcopy(sample[0])  # a workspace whose params are not the head's
    stale["data"]["params"]["params.yaml"]["data"]["seed"] = 12345
    rows = {r.exp.id: r for r in match_records(cat, parse_exp_show([stale, head, older]))}
    assert rows[cat.reference].record.kind == "baseline"
    assert rows[cat.reference].record.rev == head["rev"]
    fresh = {r.exp.id: r for r in match_records(cat, parse_exp_show([sample[0], head, older]))}
    assert fresh[cat.reference].record.kind == "workspace"


def test_one_default_switch_is_one_line_over_every_commit_it_flags() -> None:
    """A default switched once flags records of many commits alike: one line per difference,
    naming every id and every commit; a different difference gets its own line."""
    from ccnf.catalog import Experiment, ExpRecord, Row
    from ccnf.study_report import earlier_defaults_notes

    def row(exp_id: str, commit: str, diff: str | None) -> Row:
        rec = ExpRecord(exp_id, "r", {}, {}, baseline=commit * 40)
        return Row(Experiment(exp_id, "x", ()), rec, None, diff)

    switch = "flow.class_norm_mean: now 'position', then absent ('channel' by default)"
    lines = earlier_defaults_notes([
        row("E0", "a", switch), row("E4", "b", switch), row("E6", "a", switch),
        row("adapters", "c", "train.adapter_rank: now 6, then 3"), row("E11", "d", None),
    ])
    assert lines == [
        f"- `E0`, `E4`, `E6` ({'a' * 7}, {'b' * 7}): {switch}",
        f"- `adapters` ({'c' * 7}): train.adapter_rank: now 6, then 3",
    ]


def test_targets_table_compares_the_roles_records() -> None:
    """Each competence target: both sides read from the named experiments' records, the gap,
    and whether it is met (>= with its margin); a missing record is '—', never 'yes'."""
    from ccnf.catalog import Experiment, ExpRecord, Row
    from ccnf.study_report import TARGETS, targets_table

    def row(exp_id: str, latent: dict) -> Row:
        return Row(Experiment(exp_id, "x", ()), ExpRecord(exp_id, "r", {}, {"latent": latent}))

    rows = [
        row("G", {"image_auroc": 0.95, "pixel_auroc": 0.97}),
        row("B", {"image_auroc": 0.96, "pixel_auroc": 0.965}),
        row("J", {"image_auroc": 0.951, "pixel_auroc": 0.96}),
        row("S", {"image_diagonal": 0.93, "pixel_diagonal": 0.95,
                  "pixel_auroc_worst_class": 0.49}),
    ]
    roles = {"gaussian": "G", "flow_bank": "B", "joint": "J", "sequential": "S"}
    lines = targets_table(rows, roles, "latent").splitlines()[2:]
    assert len(lines) == len(TARGETS)
    # bank >= Gaussian: image yes (0.96 >= 0.95), pixel no (0.965 < 0.97)
    image, pixel = (ln for ln in lines if ln.startswith("| flow bank"))
    assert image.endswith("| 0.9600 | 0.9500 | 0.0100 | yes |")
    assert pixel.endswith("| 0.9650 | 0.9700 | -0.0050 | no |")
    joint_image = next(ln for ln in lines if ln.startswith("| CCNF joint") and "image" in ln)
    assert joint_image.endswith("| 0.9510 | 0.9600 | -0.0090 | yes |")  # within - 0.01
    diag_pixel = next(ln for ln in lines if "right after" in ln and "pixel" in ln)
    assert diag_pixel.endswith("| 0.9500 | 0.9700 | -0.0200 | yes |")  # exactly the margin
    worst = next(ln for ln in lines if ln.startswith("| no class below"))
    assert worst.endswith("| 0.4900 | 0.5000 | -0.0100 | no |")
    missing = targets_table(rows[:2], roles, "latent")
    assert "| — | — |" in missing and "| — |\n" in missing + "\n"


def test_strategy_table_reads_strategy_protocol_memory_and_time_from_the_records() -> None:
    """One row per strategy x protocol record: strategy and protocol from the record's params,
    A-AUROC, routing accuracy, KB added per later task and the catalog's wall seconds."""
    from ccnf.catalog import Experiment, ExpRecord, Row

    metrics = {
        "nf": {"image_auroc": 0.9, "pixel_auroc": 0.95, "image_auroc_over_classes": 0.91,
               "image_step_average": 0.93,
               "pixel_step_average": 0.96, "image_forgetting": 0.001, "pixel_forgetting": 0.0},
        "agnostic": {"nf": {"image_auroc": 0.8}},
        "class_select": {"method": "prototype", "accuracy": 0.75},
        "memory": {"added_bytes_per_task": 2048.0, "stored_images": 0},
    }
    params = {"train": {"strategy": "adapters"}, "data": {"protocol": "15x1"}}
    rows = [Row(Experiment("adapters-15x1", "x", (), protocol="15x1"),
                ExpRecord("adapters-15x1", "r", params, metrics)),
            Row(Experiment("naive-3x5", "x", (), protocol="3x5"), None)]
    leaky = {"score": "nf", "image_auroc": 0.92, "pixel_auroc": 0.96}
    rows.append(Row(Experiment("E11-leaky", "x", ()),
                    ExpRecord("E11-leaky", "r", {}, {**metrics, "test_selected_leaky": leaky})))
    timing = {"experiments": {"adapters-15x1": {"seconds": 612.4}}}
    block = table_block(rows, "E11", strategies=["adapters-15x1", "naive-3x5", "E11-leaky"],
                        timing=timing)
    assert "#### continual strategies x protocols" in block
    cells = _line(block, "continual strategies", "adapters-15x1")
    assert cells == ["adapters", "15x1", "0.9000", "0.9500", "0.9100", "0.9300", "0.9600", "0.0010",
                     "0.0000", "0.7500", "0.8000", "2.0", "0", "612", "—"]
    # the leaky figure only where the run asked for it, and only for the table's score
    assert _line(block, "continual strategies", "E11-leaky")[-1] == "0.9200"
    other = table_block(rows, "E11", strategies=["E11-leaky"], headline="latent")
    assert _line(other, "continual strategies", "E11-leaky")[-1] == "—"
    # wall seconds only for a record of the commit the timing file timed
    timed = {**timing, "commit": "abc1234def"}
    stale = table_block(rows, "E11", strategies=["adapters-15x1"], timing=timed)
    assert _line(stale, "continual strategies", "adapters-15x1")[-2] == "—"
    rows[0] = Row(rows[0].exp, ExpRecord("adapters-15x1", "r", params, metrics,
                                         baseline="abc1234def"))
    same = table_block(rows, "E11", strategies=["adapters-15x1"], timing=timed)
    assert _line(same, "continual strategies", "adapters-15x1")[-2] == "612"
    missing = _line(block, "continual strategies", "naive-3x5")
    assert missing[:2] == ["—", "3x5"] and set(missing[2:]) == {"—"}
    assert "continual strategies" not in table_block(rows, "E11")


def test_rows_without_a_record_keep_their_committed_figures_marked_and_unchecked(
        sample, tmp_path) -> None:
    """A new machine has none of DVC's records: re-rendering keeps each such experiment's
    committed lines whole, marked †, and says so; `catalog check` cannot verify them and says
    that too, while rows with records are still compared number by number."""
    cat, rows = _rows(sample)
    report = tmp_path / "REPORT.md"
    write_report(rows, cat.reference, report, tmp_path, tmp_path / "t.json", make_plots=False)
    before = _line(get_block(report.read_text(), "catalog-table", report), "nf", "E0")
    lost = [replace(r, record=None) if r.exp.id == "E0" else r for r in rows]
    write_report(lost, cat.reference, report, tmp_path, tmp_path / "t.json", make_plots=False)
    block = get_block(report.read_text(), "catalog-table", report)
    assert _line(block, "nf", "E0 †") == before  # the same figures, marked
    assert "† kept from the committed REPORT.md" in block and "E0 (`ccnf catalog run E0`" in block
    never = [r for r in parse_tables(block) if r.exp_id.startswith("E1 ")]
    assert not never and "not run: " in block  # a row never measured stays empty
    problems = check_report(lost, cat.reference, report, 0.002)
    assert "E0: no record to check its † row against (ccnf catalog run E0)" in problems
    assert check_report(lost, cat.reference, report, 0.002, ["E9-cal", "E11"]) == []
    # a record measured again replaces the kept line and is compared as usual
    write_report(rows, cat.reference, report, tmp_path, tmp_path / "t.json", make_plots=False)
    block = get_block(report.read_text(), "catalog-table", report)
    assert _line(block, "nf", "E0") == before and "E0 †" not in block


def test_plot_links_are_relative_to_the_report_or_absolute_outside_it(tmp_path: Path) -> None:
    """A report written outside the repository (benchmarks/industrial12.py --report) links its
    plots by absolute path instead of failing after the experiments have run."""
    plot = tmp_path / "repo" / "docs" / "report" / "industrial12_scores.png"
    inside = plots_block([plot], tmp_path / "repo" / "REPORT.md")
    assert "(docs/report/industrial12_scores.png)" in inside
    elsewhere = tmp_path / "other" / "REPORT.md"
    outside = plots_block([plot], elsewhere)
    assert f"({plot.as_posix()})" in outside
