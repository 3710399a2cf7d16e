"""REPORT.md: the whole catalog's comparison table, plots, timing, and the check CI runs.

Everything generated lives between markers, so ``ccnf catalog report`` rewrites only those
blocks and keeps the hand-written reading around them:

* ``<!-- catalog-table:begin/end -->``: the competence targets (:data:`TARGETS`, met or not,
  by how much), one markdown table per score definition (nf, latent, proto, hybrid:
  image/pixel AUROC, AUPRO, image/pixel forgetting, image/pixel AUROC right after each task),
  class selection and the task-agnostic headline AUROC next to the research note's MVTec
  figures, and the per-class baselines next to anomalib's models on the same data. Rendered
  from DVC's experiment records (``dvc exp show --json``), never from files of our own.
  ``benchmarks/industrial12.py`` renders the same tables from a run on real images into
  ``<!-- industrial12-table:begin/end -->``.
* ``<!-- catalog-plots:begin/end -->``: links to the plots under ``docs/report/``.
* ``<!-- catalog-timing:begin/end -->``: wall time of the last ``ccnf catalog run --all``
  (``docs/report/catalog_timing.json``).

``ccnf catalog check`` re-renders the table from the current records and compares every number
with the committed one within a tolerance.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccnf.atomic import atomic_path, write_text
from ccnf.catalog import SCORE_DEFS, Row, record_baselines
from ccnf.errors import CcnfError

REPORT_FILE = Path("REPORT.md")
REPORT_DIR = Path("docs/report")
TIMING_FILE = REPORT_DIR / "catalog_timing.json"
DEFAULT_TOLERANCE = 0.002
MISSING = "—"
BLOCKS = ("catalog-table", "catalog-plots", "catalog-timing")
METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_forgetting", "image forgetting"),
    ("pixel_forgetting", "pixel forgetting"),
    ("image_diagonal", "image, right after its task"),
    ("pixel_diagonal", "pixel, right after its task"),
    ("pixel_auroc_worst_class", "worst class pixel AUROC"),
)
SCORE_TITLES = {
    "nf": "nf: -log p(x|y)/D, oracle (task-aware) class",
    "latent": "latent: 0.5 ||z - mu||^2 / D (no log-det), oracle class",
    "proto": "proto: distance of the latent mean to the class prototype, oracle class",
    "hybrid": "hybrid (E12): calibrated mix of proto and nf, oracle class",
}


@dataclass(frozen=True)
class Target:
    """left >= right + margin, each side a (catalog role, summary metric) of one score."""

    text: str
    left: tuple[str, str]
    right: tuple[str, str]
    margin: float


# the competence targets of issue 10 (roles name experiments in catalog.yaml's ``targets``)
TARGETS = (
    *(
        t
        for kind in ("image", "pixel")
        for t in (
            Target(f"flow bank >= Gaussian floor ({kind} AUROC)",
                   ("flow_bank", f"{kind}_auroc"), ("gaussian", f"{kind}_auroc"), 0.0),
            Target(f"CCNF joint >= flow bank - 0.01 ({kind} AUROC)",
                   ("joint", f"{kind}_auroc"), ("flow_bank", f"{kind}_auroc"), -0.01),
            Target(f"CCNF right after each task >= Gaussian - 0.02 ({kind} AUROC)",
                   ("sequential", f"{kind}_diagonal"), ("gaussian", f"{kind}_auroc"), -0.02),
        )
    ),
    # right side empty: left >= margin
    Target("no class below 0.5 pixel AUROC in the sequential (default) row",
           ("sequential", "pixel_auroc_worst_class"), ("", ""), 0.5),
)
NUMBER = re.compile(r"[-+]?\d+\.\d+")


# ----------------------------------------------------------------------------- values


def _get(metrics: dict[str, Any], *path: str) -> float | None:
    node: Any = metrics
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return None if math.isnan(float(node)) else float(node)


def _fmt(v: float | None) -> str:
    return MISSING if v is None else f"{v:.4f}"


def _metrics(row: Row) -> dict[str, Any]:
    return row.record.metrics if row.record is not None else {}


def _class_select(row: Row) -> tuple[str, float | None]:
    cs = _metrics(row).get("class_select")
    if not isinstance(cs, dict):
        return MISSING, None
    method = cs.get("method")
    return (str(method) if method else MISSING), _get(cs, "accuracy")


# ----------------------------------------------------------------------------- tables


def score_table(rows: Sequence[Row], score: str) -> str:
    """Markdown table of one score definition: a row per catalog experiment."""
    head = "| experiment | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(METRIC_COLUMNS)
    lines = [head, sep]
    for row in rows:
        m = _metrics(row)
        cells = [_fmt(_get(m, score, key)) for key, _ in METRIC_COLUMNS]
        lines.append(f"| {row.exp.id} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(rows: Sequence[Row], roles: dict[str, str], score: str) -> str:
    """The competence targets, each with both sides' values and whether it is met."""
    by_id = {r.exp.id: r for r in rows}
    head = "| target | left | right | left - right | met |"
    lines = [head, "|---|---:|---:|---:|---|"]
    for t in TARGETS:
        left = _role_value(by_id, roles, t.left[0], score, t.left[1])
        right = (t.margin if not t.right[0] else
                 _role_value(by_id, roles, t.right[0], score, t.right[1]))
        margin = 0.0 if not t.right[0] else t.margin
        if left is None or right is None:
            gap, met = None, MISSING
        else:
            gap = left - right
            met = "yes" if gap >= margin - 1e-12 else "no"
        names = [f"`{roles.get(t.left[0], '?')}` {t.left[1]}"]
        names.append(f"`{roles.get(t.right[0], '?')}` {t.right[1]}" if t.right[0] else "0.5")
        lines.append(f"| {t.text} ({' vs '.join(names)}) | {_fmt(left)} | {_fmt(right)} | "
                     f"{_fmt(gap)} | {met} |")
    return "\n".join(lines)


def _role_value(by_id: dict[str, Row], roles: dict[str, str], role: str, score: str,
                key: str) -> float | None:
    row = by_id.get(roles.get(role, ""))
    return None if row is None else _get(_metrics(row), score, key)


def peers_table(rows: Sequence[Row], peers: dict[str, Any] | None) -> str:
    """The per-class baselines next to anomalib's models on the same data (when measured)."""
    pairs = (("B-gaussian", "padim", "Padim"), ("B-flow_bank", "cflow", "Cflow"),
             ("B-fastflow", "fastflow", "Fastflow"))
    head = ("| ours | image AUROC | pixel AUROC | anomalib (same data, backbone, weights) | "
            "classes | image AUROC | pixel AUROC |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|"]
    by_id = {r.exp.id: r for r in rows}
    summary = (peers or {}).get("summary", {})
    for exp_id, key, name in pairs:
        if exp_id not in by_id:
            continue
        m = _metrics(by_id[exp_id])
        peer = summary.get(key, {})
        lines.append(
            f"| {exp_id} (nf) | {_fmt(_get(m, 'nf', 'image_auroc'))} | "
            f"{_fmt(_get(m, 'nf', 'pixel_auroc'))} | {name} | "
            f"{peer.get('classes', MISSING)} | {_fmt(peer.get('image_AUROC_mean'))} | "
            f"{_fmt(peer.get('pixel_AUROC_mean'))} |"
        )
    return "\n".join(lines)


def selection_table(rows: Sequence[Row], score: str = "nf") -> str:
    """Class selection, task-agnostic AUROC, and the note's MVTec figure next to ours."""
    head = (f"| experiment | class select | selection accuracy | agnostic {score} image AUROC | "
            f"agnostic {score} pixel AUROC | ours {score} image AUROC | ours {score} pixel "
            "AUROC | note (MVTec) nf image AUROC | note (MVTec) nf pixel AUROC |")
    sep = "|---|---|" + "---:|" * 7
    lines = [head, sep]
    for row in rows:
        m = _metrics(row)
        method, acc = _class_select(row)
        note = row.exp.note
        cells = [
            method,
            _fmt(acc),
            _fmt(_get(m, "agnostic", score, "image_auroc")),
            _fmt(_get(m, "agnostic", score, "pixel_auroc")),
            _fmt(_get(m, score, "image_auroc")),
            _fmt(_get(m, score, "pixel_auroc")),
            _fmt(note.image_auroc if note else None),
            _fmt(note.pixel_auroc if note else None),
        ]
        lines.append(f"| {row.exp.id} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STRATEGY_COLUMNS = (
    "final image", "final pixel", "final image, class mean", "A-AUROC image", "A-AUROC pixel",
    "forgetting image", "forgetting pixel", "routing accuracy", "routed image", "added KB per task",
    "stored images", "wall s", "LEAKY test-selected image",
)


def _param(row: Row, *path: str) -> Any:
    node: Any = row.record.params if row.record is not None else {}
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def strategy_table(rows: Sequence[Row], score: str, timing: dict[str, Any] | None) -> str:
    """Strategy x protocol (issue 13): after the last task, the mean over steps of the seen-task
    average (A-AUROC), forgetting, routing (class-selection) accuracy and the task-agnostic
    image AUROC it yields, what each later task adds to the model, stored images, wall time,
    and, only for a run that asked for it (``eval.test_selected``), the leaky final image AUROC
    of the snapshots chosen on the test data (the papers' practice, never our figure)."""
    head = "| experiment | strategy | protocol | " + " | ".join(STRATEGY_COLUMNS) + " |"
    lines = [head, "|---|---|---|" + "---:|" * len(STRATEGY_COLUMNS)]
    per = (timing or {}).get("experiments", {})
    timed_commit = str((timing or {}).get("commit") or "")[:7]
    for row in rows:
        m = _metrics(row)
        _, acc = _class_select(row)
        added = _get(m, "memory", "added_bytes_per_task")
        stored = _get(m, "memory", "stored_images")
        seconds = per.get(row.exp.id, {}).get("seconds")
        if timed_commit and (row.record is None or row.record.baseline[:7] != timed_commit):
            seconds = None  # timed on another commit: not this record's run
        leaky = m.get("test_selected_leaky") or {}
        cells = [
            *(_fmt(_get(m, score, key)) for key in (
                "image_auroc", "pixel_auroc", "image_auroc_over_classes", "image_step_average",
                "pixel_step_average", "image_forgetting", "pixel_forgetting")),
            _fmt(acc),
            _fmt(_get(m, "agnostic", score, "image_auroc")),
            MISSING if added is None else f"{added / 1024:.1f}",
            MISSING if stored is None else f"{stored:.0f}",
            MISSING if seconds is None else f"{float(seconds):.0f}",
            _fmt(leaky.get("image_auroc") if leaky.get("score") == score else None),
        ]
        strategy = _param(row, "train", "strategy") or MISSING
        protocol = _param(row, "data", "protocol") or row.exp.protocol or MISSING
        lines.append(f"| {row.exp.id} | {strategy} | {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_block(
    rows: Sequence[Row],
    reference: str,
    *,
    roles: dict[str, str] | None = None,
    headline: str = "nf",
    peers: dict[str, Any] | None = None,
    data: str = "the embedded synthetic data",
    strategies: Sequence[str] = (),
    timing: dict[str, Any] | None = None,
    earlier: str | None = None,
) -> str:
    """The generated table block of REPORT.md (all tables, and any record problems).

    roles: catalog.yaml's ``targets`` (which experiment is the Gaussian floor, the flow bank,
    joint and the sequential default); headline: the score the targets are read on; peers:
    benchmarks/anomalib_peers.json (None: no anomalib figures on this data); strategies: the
    ids of the strategy x protocol table (catalog.yaml's ``subsets.strategies``), timing:
    the catalog timing file (its wall seconds per experiment); earlier: the block as
    committed, whose rows stand in, marked :data:`KEPT`, for experiments without a record
    (:func:`keep_earlier_rows`).
    """
    parts = [
        f"Final averages after the last task, per score definition; forgetting = mean over "
        f"earlier tasks of (best earlier value - final value); 'right after its task' = mean "
        f"of R[j][j], each task evaluated just after it was learned. `{reference}` is "
        f"params.yaml itself; {MISSING} = not run, or not reported by this version of the "
        f"pipeline. Data: {data}. Source: `dvc exp show --json` (rendered by "
        f"`ccnf catalog table`).",
    ]
    if roles:
        parts.append(f"#### competence targets ({headline} score)\n\n"
                     + targets_table(rows, roles, headline))
    for score in SCORE_DEFS:
        parts.append(f"#### {SCORE_TITLES[score]}\n\n{score_table(rows, score)}")
    parts.append(
        "#### class selection (task-agnostic block) and the research note\n\n"
        "The note's figures are its final nf image/pixel AUROC on MVTec AD (1 epoch per task); "
        f"ours are on {data}.\n\n" + selection_table(rows, headline)
    )
    wanted = [r for r in rows if r.exp.id in set(strategies)]
    if wanted:
        parts.append(
            f"#### continual strategies x protocols ({headline} score)\n\n"
            "Final = after the last task (what the model is left with), the mean over tasks; "
            "class mean = the same over classes (what per-class paper tables end in; it differs "
            "from the task mean only when tasks differ in size: 10-5, 14-1; — = a record made "
            "before it was reported); A-AUROC = mean over "
            "steps of the average over the tasks seen so far (what the IUF and CDAD tables "
            "print); routing accuracy = how often the task-agnostic block picks the true "
            "class (hence the adapter), routed image = the image AUROC with that pick; added "
            "KB per task = growth of the model per later task; stored images = training "
            "images of earlier tasks kept; wall s = the run's wall time in the catalog timing "
            "file (training and evaluation; shown only for records of the commit it timed); "
            "LEAKY test-selected image = the final image AUROC when each task keeps the best "
            "of `eval.test_selected` snapshots chosen on the test data, as UCAD, CDAD and "
            "IUF report (only for a run that asked for it; never our figure).\n\n"
            + strategy_table(wanted, headline, timing)
        )
    parts.append(
        "#### per-class baselines and anomalib's models on the same data\n\n"
        + ("anomalib 2.7.0 on the same images, backbone and weights "
           "(benchmarks/anomalib_peers.md; its classes column says how many of ours it ran)."
           if peers else "No anomalib figures on this data.")
        + "\n\n" + peers_table(rows, peers)
    )
    commits = record_baselines(rows)
    ref = next((r for r in rows if r.exp.id == reference), None)
    origin = [f"experiments derived from commit{'s' if len(commits) > 1 else ''} "
              f"{', '.join(commits)}"] if commits else []
    if ref is not None and ref.record is not None and ref.record.kind != "experiment":
        origin.append(f"`{reference}` from the {ref.record.kind} (the default study)")
    if origin:
        parts.append("Records: " + "; ".join(origin) + ".")
    problems = [f"- `{r.exp.id}`: {r.problem}" for r in rows if r.problem]
    missing = [r.exp.id for r in rows if r.record is None]
    kept: list[str] = []
    if earlier is not None and missing:
        body, kept = keep_earlier_rows("\n\n".join(parts), earlier, missing)
        parts = [body]
        missing = [m for m in missing if m not in kept]
    if kept:
        problems.append(
            f"- {KEPT} kept from the committed REPORT.md, no record of them here (DVC's "
            f"records stay on the machine that ran them; measured before "
            f"docs/report/*_records.json kept them, possibly under earlier defaults): "
            f"{', '.join(kept)} (`ccnf catalog run {' '.join(kept)}` measures them again)")
    if missing:
        problems.append(f"- not run: {', '.join(missing)} (`ccnf catalog run "
                        f"{' '.join(missing)}`)")
    if problems:
        parts.append("Record problems:\n\n" + "\n".join(problems))
    earlier = earlier_defaults_notes(rows)
    if earlier:
        parts.append("Records made under earlier defaults (params.yaml changed after they "
                     "were run; a key the run never reads, e.g. train.adapter_rank outside "
                     "train.strategy=adapters, leaves its figures as they are):\n\n"
                     + "\n".join(earlier))
    return "\n\n".join(parts)


def earlier_defaults_notes(rows: Sequence[Row]) -> list[str]:
    """One line per difference: the ids whose record ran under those other defaults, and the
    commits their records derive from (a default switched once flags many commits alike)."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
        if r.record is not None and r.earlier_defaults:
            ids, commits = groups.setdefault(r.earlier_defaults, ([], []))
            ids.append(f"`{r.exp.id}`")
            if r.record.baseline[:7] not in commits:
                commits.append(r.record.baseline[:7])
    return [f"- {', '.join(ids)} ({', '.join(commits)}): {diff}"
            for diff, (ids, commits) in groups.items()]


KEPT = "†"


def _bare_id(exp_id: str) -> str:
    return exp_id.removesuffix(f" {KEPT}")


def keep_earlier_rows(block: str, earlier: str, ids: Sequence[str]) -> tuple[str, list[str]]:
    """``block`` with each table line of an experiment in ``ids`` (those without a record)
    replaced by the same table's line of that experiment in ``earlier`` (the committed block),
    its id marked :data:`KEPT`, when that experiment was measured there (a figure in one of
    the score tables); returns the block and the ids kept. Figures are never computed or
    edited here: a line is taken whole or not at all."""
    old: dict[tuple[str, str], str] = {}
    measured: set[str] = set()
    score_titles = tuple(SCORE_TITLES.values())
    for title, cells, line in _lines(earlier):
        if cells:
            old[(title, _bare_id(cells[0]))] = line.strip()
            if title in score_titles and any(NUMBER.fullmatch(c) for c in cells[1:]):
                measured.add(_bare_id(cells[0]))
    wanted, kept, out = set(ids) & measured, [], []
    for title, cells, line in _lines(block):
        prior = old.get((title, cells[0])) if cells else None
        if cells and cells[0] in wanted and prior is not None:
            first, rest = prior.strip("|").split("|", 1)
            line = f"| {_bare_id(first.strip())} {KEPT} |{rest}|"
            if cells[0] not in kept:
                kept.append(cells[0])
        out.append(line)
    return "\n".join(out), kept


def _lines(block: str) -> Iterator[tuple[str, list[str], str]]:
    """(title of the ``####`` table it is under, its cells if a table line else [], line)."""
    title = ""
    for line in block.splitlines():
        s = line.strip()
        if s.startswith("#### "):
            title = s[5:].strip()
        cells = [c.strip() for c in s.strip("|").split("|")] if s.startswith("|") else []
        yield title, cells, line


# ----------------------------------------------------------------------------- check


@dataclass(frozen=True)
class TableRow:
    """A parsed markdown table row: which table, which experiment, its cells."""

    table: str
    exp_id: str
    cells: tuple[str, ...]
    header: tuple[str, ...]


def parse_tables(block: str) -> list[TableRow]:
    """Rows of every ``#### title`` table in a rendered block (header and separator skipped)."""
    rows: list[TableRow] = []
    title = ""
    header: tuple[str, ...] = ()
    for line in block.splitlines():
        s = line.strip()
        if s.startswith("#### "):
            title, header = s[5:].strip(), ()
            continue
        if not s.startswith("|"):
            continue
        cells = tuple(c.strip() for c in s.strip("|").split("|"))
        if not header:
            header = cells
            continue
        if all(set(c) <= set("-:") for c in cells):
            continue
        rows.append(TableRow(title, cells[0], cells[1:], header[1:]))
    return rows


def compare_tables(
    committed: str, fresh: str, tolerance: float, ids: Sequence[str] | None = None
) -> list[str]:
    """Every difference between two rendered blocks beyond ``tolerance`` (empty: they match).

    ``ids`` restricts the comparison to those experiments (CI runs a subset of the catalog).
    A number against '—' (an experiment not run, a metric not reported) is a difference.
    """
    old = {(r.table, r.exp_id): r for r in parse_tables(committed)}
    new = {(r.table, r.exp_id): r for r in parse_tables(fresh)}
    wanted = set(ids) if ids is not None else None
    problems = []
    for key in sorted(set(old) | set(new)):
        table, exp_id = key
        if wanted is not None and exp_id not in wanted:
            continue
        short = table.split(":")[0]
        if key not in new:
            problems.append(f"{short} / {exp_id}: in REPORT.md but not in the catalog any more")
            continue
        if key not in old:
            problems.append(f"{short} / {exp_id}: not in REPORT.md (regenerate it)")
            continue
        o, n = old[key], new[key]
        if o.header != n.header:
            problems.append(f"{short}: columns differ: REPORT.md {o.header} vs fresh {n.header}")
            continue
        for col, oc, nc in zip(n.header, o.cells, n.cells, strict=False):
            if NUMBER.fullmatch(oc) and NUMBER.fullmatch(nc):
                if abs(float(oc) - float(nc)) > tolerance:
                    problems.append(f"{short} / {exp_id} / {col}: REPORT.md {oc} vs fresh {nc} "
                                    f"(|diff| {abs(float(oc) - float(nc)):.4f} > {tolerance})")
            elif oc != nc:
                problems.append(f"{short} / {exp_id} / {col}: REPORT.md '{oc}' vs fresh '{nc}'")
    if wanted is not None:
        present = {k[1] for k in new}
        for exp_id in sorted(wanted - present):
            problems.append(f"{exp_id}: not a catalog experiment")
    return problems


# ----------------------------------------------------------------------------- the file


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def get_block(text: str, name: str, path: Path) -> str:
    """The text between a block's markers."""
    begin, end = _markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise CcnfError(f"{path} lacks one well-formed '{name}' block",
                        where=str(path), fix=f"keep exactly one {begin} ... {end} pair in it")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def set_block(text: str, name: str, body: str, path: Path) -> str:
    """``text`` with a block's contents replaced (everything outside it is kept)."""
    get_block(text, name, path)
    begin, end = _markers(name)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def _data_section(title: str, prefix: str) -> str:
    """One data set's part of a new REPORT.md: its table, plots and timing blocks."""
    parts = [f"## {title}"]
    for heading, kind in ((None, "table"), ("### Plots", "plots"), ("### Time", "timing")):
        parts += [heading] if heading else []
        parts.append("\n".join(_markers(f"{prefix}-{kind}")))
    return "\n\n".join(parts)


TEMPLATE = f"""# ccnf: the variant catalog

    bash scripts/catalog.sh                 # set up, run the whole catalog, rewrite this file
    ccnf catalog run E0 E6                  # some experiments (= dvc exp run -n ID -S ...)
    ccnf catalog table                      # comparison table from DVC's experiment records
    ccnf catalog check --tolerance 0.002    # compare them with this file (CI: --ci)

{_data_section("Synthetic data: the whole catalog", "catalog")}

{_data_section("Real images: industrial12", "industrial12")}

## Reading

(Hand-written; `ccnf catalog report` rewrites only the marked blocks above.)
"""


def plots_block(paths: Sequence[Path], report: Path) -> str:
    """Markdown image links to the plots, relative to REPORT.md."""
    captions = {
        "forgetting": "forgetting per variant (headline and hybrid score, image and pixel)",
        "scores": "score definitions side by side: final image and pixel AUROC per variant",
        "image_vs_pixel": "headline image vs pixel AUROC: ours and the note (MVTec AD, nf)",
    }
    lines = []
    for p in map(Path, paths):
        rel = _relative(p, report) if p.is_absolute() else p
        stem = p.stem.removeprefix("industrial12_")
        lines.append(f"![{captions.get(stem, stem)}]({rel.as_posix()})")
    return "\n\n".join(lines) if lines else "(no plots: no experiment has results yet)"


def timing_block(timing: dict[str, Any] | None, n_catalog: int | None = None) -> str:
    """The time section, from the JSON that ``ccnf catalog run --all`` writes."""
    if not timing:
        return (f"Not measured yet: `ccnf catalog run --all` writes {TIMING_FILE.as_posix()}.")
    per = timing.get("experiments", {})
    total = float(timing.get("wall_s", 0.0))
    whole = timing.get("all", n_catalog is not None and len(per) >= n_catalog)
    what = (f"The whole catalog ({len(per)} experiments" if whole else
            f"{len(per)} of the {n_catalog or '?'} catalog experiments ({', '.join(per)}")
    selector = "--all" if whole else " ".join(per)
    lines = [
        f"{what}, `ccnf catalog run {selector} "
        f"--mode {timing.get('mode')} --jobs {timing.get('jobs')}`) took **{total / 60:.1f} "
        f"min** of wall time on {timing.get('cpus')} CPU cores ({timing.get('date', '?')}, "
        f"commit {str(timing.get('commit', '?'))[:7]}, load average "
        f"{timing.get('load_avg_start', '?')} at the start), on top of one default study "
        f"(`dvc repro`) whose features every experiment reuses.",
        "",
        "| experiment | seconds | stages DVC ran |",
        "|---|---:|---|",
    ]
    for exp_id, e in per.items():
        stages = e.get("stages_run") or []
        shown = ", ".join(_compress_stages(stages)) or "(none: restored from the run cache)"
        lines.append(f"| {exp_id} | {float(e.get('seconds', 0)):.0f} | {shown} |")
    shared = sorted({s for e in per.values() for s in e.get("stages_run", [])
                     if s.split("@")[0] in ("synth", "prepare", "extract")})
    lines += ["", "Shared stages re-run by any experiment: "
              + (", ".join(shared) if shared else "none (features extracted once).")]
    return "\n".join(lines)


def _compress_stages(stages: Sequence[str]) -> list[str]:
    """['train@t0', 'train@t1', 'aggregate'] -> ['train@t0..t1', 'aggregate']."""
    groups: dict[str, list[str]] = {}
    order: list[str] = []
    for s in stages:
        base, _, item = s.partition("@")
        if base not in groups:
            order.append(base)
            groups[base] = []
        if item:
            groups[base].append(item)
    out = []
    for base in order:
        items = groups[base]
        if not items:
            out.append(base)
        elif len(items) == 1:
            out.append(f"{base}@{items[0]}")
        else:
            out.append(f"{base}@{items[0]}..{items[-1]}")
    return out


def read_timing(path: Path = TIMING_FILE) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CcnfError(f"{path} is not valid JSON: {err}",
                        fix="re-run ccnf catalog run --all, or delete the file") from None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class ReportSpec:
    """Which blocks of REPORT.md a set of records fills, and how to read them.

    block: marker prefix (``<block>-table``, ``<block>-plots``, ``<block>-timing``) and plot /
    timing file prefix; roles: catalog.yaml's ``targets``; headline: ``score.headline``;
    peers: anomalib's figures on the same data (None: none); data: what the rows ran on.
    """

    block: str = "catalog"
    roles: dict[str, str] | None = None
    headline: str = "nf"
    peers: dict[str, Any] | None = None
    data: str = "the embedded synthetic data"
    strategies: tuple[str, ...] = ()

    @property
    def timing_file(self) -> Path:
        return TIMING_FILE if self.block == "catalog" else REPORT_DIR / f"{self.block}_timing.json"

    @property
    def records_file(self) -> Path:
        """The archive of the records behind the block's table (:mod:`ccnf.catalog.archive`)."""
        return REPORT_DIR / f"{self.block}_records.json"

    def table(self, rows: Sequence[Row], reference: str, earlier: str | None = None) -> str:
        return table_block(rows, reference, roles=self.roles, headline=self.headline,
                           peers=self.peers, data=self.data, strategies=self.strategies,
                           timing=read_timing(self.timing_file), earlier=earlier)


PEERS_FILE = Path("benchmarks/anomalib_peers.json")


def read_peers(path: Path = PEERS_FILE) -> dict[str, Any] | None:
    """anomalib's figures on the synthetic data (benchmarks/anomalib_peers.py), if measured."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CcnfError(f"{path} is not valid JSON: {err}",
                        fix="re-run benchmarks/anomalib_peers.py or git checkout it") from None
    return data if isinstance(data, dict) else None


def write_report(
    rows: Sequence[Row],
    reference: str,
    report: Path = REPORT_FILE,
    plot_dir: Path = REPORT_DIR,
    timing_file: Path | None = None,
    make_plots: bool = True,
    spec: ReportSpec | None = None,
) -> list[Path]:
    """Create or update REPORT.md's generated blocks (and the plots); returns plot paths."""
    spec = spec or ReportSpec()
    text = report.read_text(encoding="utf-8") if report.is_file() else TEMPLATE
    prefix = "" if spec.block == "catalog" else f"{spec.block}_"
    plots = plot_all(rows, plot_dir, prefix, spec.headline) if make_plots else []
    rel_plots = [_relative(p, report) for p in plots]
    timing = read_timing(timing_file or spec.timing_file)
    earlier = _existing_block(text, f"{spec.block}-table", report)
    text = set_block(text, f"{spec.block}-table", spec.table(rows, reference, earlier), report)
    text = set_block(text, f"{spec.block}-plots", plots_block(rel_plots, report), report)
    text = set_block(text, f"{spec.block}-timing", timing_block(timing, len(rows)), report)
    write_text(report, text)
    return plots


def _existing_block(text: str, name: str, path: Path) -> str | None:
    """The committed block ``name`` of the report text, None when it has none yet."""
    begin, end = _markers(name)
    return get_block(text, name, path) if begin in text and end in text else None


def _relative(p: Path, report: Path) -> Path:
    try:
        return p.resolve().relative_to(report.resolve().parent)
    except ValueError:
        return p


def check_report(rows: Sequence[Row], reference: str, report: Path, tolerance: float,
                 ids: Sequence[str] | None = None, spec: ReportSpec | None = None) -> list[str]:
    """Differences between REPORT.md's committed table and one rendered from ``rows``."""
    spec = spec or ReportSpec()
    if not report.is_file():
        raise CcnfError(f"{report} not found", fix="ccnf catalog report (after catalog run)")
    committed = get_block(report.read_text(encoding="utf-8"), f"{spec.block}-table", report)
    # only the lines already marked stand in: an unmarked figure without a record is a
    # difference (a lost or unrun record), not something to carry over silently
    marked = "\n".join(ln for ln in committed.splitlines()
                       if ln.startswith("#### ") or f" {KEPT} |" in ln)
    fresh = spec.table(rows, reference, marked)
    problems = compare_tables(committed, fresh, tolerance, ids)
    selected = [r for r in rows if ids is None or r.exp.id in set(ids)]
    problems += [f"{r.exp.id}: {r.problem}" for r in selected if r.problem]
    kept = {_bare_id(r.exp_id) for r in parse_tables(committed) if r.exp_id.endswith(KEPT)}
    problems += [f"{r.exp.id}: no record to check its {KEPT} row against (ccnf catalog run "
                 f"{r.exp.id})" for r in selected if r.record is None and r.exp.id in kept]
    return problems


# ----------------------------------------------------------------------------- plots


def _save(fig: Any, target: Path) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target


def plot_all(
    rows: Sequence[Row], out_dir: Path, prefix: str = "", headline: str = "nf"
) -> list[Path]:
    """The report's plots (only experiments with results); returns the written paths, named
    ``<prefix>forgetting.png`` etc."""
    done = [r for r in rows if r.record is not None and _get(r.record.metrics, headline,
                                                              "image_auroc") is not None]
    if not done:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [r.exp.id for r in done]
    y = list(range(len(ids)))
    paths = []

    # 1. forgetting per variant
    series = [(headline, "image_forgetting"), (headline, "pixel_forgetting"),
              ("hybrid", "image_forgetting"), ("hybrid", "pixel_forgetting")]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ids) + 1.5), layout="constrained")
    h = 0.8 / len(series)
    for k, (score, key) in enumerate(series):
        vals = [_get(r.record.metrics, score, key) or 0.0 for r in done]  # type: ignore[union-attr]
        ax.barh([v + (k - 1.5) * h for v in y], vals, height=h,
                label=f"{score} {key.replace('_forgetting', '')}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, ids)
    ax.invert_yaxis()
    ax.set_xlabel("forgetting (AUROC lost by earlier tasks; lower is better)")
    ax.set_title("forgetting per variant")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    paths.append(_save(fig, out_dir / f"{prefix}forgetting.png"))
    plt.close(fig)

    # 2. score definitions side by side
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(ids) + 1.5), sharey=True,
                             layout="constrained")
    h = 0.8 / len(SCORE_DEFS)
    for ax, key, title in zip(axes, ("image_auroc", "pixel_auroc"),
                              ("image AUROC", "pixel AUROC"), strict=True):
        for k, score in enumerate(SCORE_DEFS):
            vals = [_get(r.record.metrics, score, key) or 0.0 for r in done]  # type: ignore[union-attr]
            ax.barh([v + (k - (len(SCORE_DEFS) - 1) / 2) * h for v in y], vals, height=h,
                    label=score)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0.3, 1.0)
        ax.set_title(f"final {title}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, ids)
    axes[0].invert_yaxis()
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("score definitions side by side (oracle class)")
    paths.append(_save(fig, out_dir / f"{prefix}scores.png"))
    plt.close(fig)

    # 3. image vs pixel AUROC: ours and the note's, same ids
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for r in done:
        m = r.record.metrics  # type: ignore[union-attr]
        xi, yp = _get(m, headline, "image_auroc"), _get(m, headline, "pixel_auroc")
        if xi is None or yp is None:
            continue
        axes[0].scatter(xi, yp, color="C0" if r.exp.note else "C7", s=18)
        axes[0].annotate(r.exp.id, (xi, yp), fontsize=7, xytext=(3, 2),
                         textcoords="offset points")
        if r.exp.note:
            axes[1].scatter(r.exp.note.image_auroc, r.exp.note.pixel_auroc, color="C1", s=18)
            axes[1].annotate(r.exp.id, (r.exp.note.image_auroc, r.exp.note.pixel_auroc),
                             fontsize=7, xytext=(3, 2), textcoords="offset points")
    axes[0].set_title(f"ours ({headline} score; blue: has a note figure)")
    axes[1].set_title("research note: MVTec AD (nf score)")
    for ax, score in zip(axes, (headline, "nf"), strict=True):
        ax.set_xlabel(f"{score} image AUROC")
        ax.set_ylabel(f"{score} pixel AUROC")
        ax.grid(alpha=0.3)
    fig.suptitle("image vs pixel AUROC per variant")
    paths.append(_save(fig, out_dir / f"{prefix}image_vs_pixel.png"))
    plt.close(fig)
    return paths
