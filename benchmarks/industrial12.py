"""The catalog on real images: a named set of experiments on industrial12, into REPORT.md.

    .venv/bin/python benchmarks/industrial12.py [--root ../shared/realdata/industrial12]
        [--protocol 3-3-2-2-2] [--jobs 2] [--workdir /tmp/ccnf-industrial12] [IDS ...]

industrial12 (``../shared/realdata/industrial12``, see its README: ten DeepPCB board designs,
magnetic tile and cookie, in MVTec layout) is never copied into this repository, and its DVC
experiments are not mixed with the synthetic catalog's. So the script

1. clones this repository's last commit into ``--workdir`` (kept between runs: its DVC cache
   holds the extracted features, so a second run skips extraction);
2. points that clone at the images with ``ccnf data use folder --root ROOT --protocol P``
   (default split, alphabetical: [cookie, magnetic_tile, pcb_00041], [pcb_12100, pcb_12300,
   pcb_13000], [pcb_20085, pcb_44000], [pcb_50600, pcb_77000], [pcb_90100, pcb_92000]) and
   commits it there;
3. runs the default study there (``dvc repro``: prepare, extract, the reference row), then the
   experiments (catalog.yaml's ``subsets.industrial12`` unless IDS are given) through
   ``ccnf catalog run`` (DVC's queue, ``--jobs`` workers);
4. renders the same tables as the synthetic catalog (targets, one table per score, class
   selection, baselines) for ``subsets.industrial12``, any IDS and every row the archive
   already holds (a run naming a few rows keeps the others), from the clone's DVC records
   (those of its earlier commits included) and the archive docs/report/industrial12_records.json
   (which it rewrites), into this repository's REPORT.md block ``industrial12-table`` (a row
   without a record keeps its committed figures, marked †), plots into
   docs/report/industrial12_*.png and the wall time into docs/report/industrial12_timing.json.

The clone runs this repository's code (PYTHONPATH points at the clone, which is the same
commit), with this repository's .venv. Commit before running: the clone sees commits only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccnf.catalog import load_catalog, load_records, match_records  # noqa: E402
from ccnf.catalog.archive import (  # noqa: E402
    load_archive,
    merge,
    rows_to_show,
    save_archive,
)
from ccnf.catalog.records import off_history_records  # noqa: E402
from ccnf.config import load_params  # noqa: E402
from ccnf.console import console  # noqa: E402
from ccnf.errors import CcnfError  # noqa: E402
from ccnf.study_report import REPORT_DIR, ReportSpec, write_report  # noqa: E402

DEFAULT_ROOT = REPO.parent / "shared" / "realdata" / "industrial12"
DEFAULT_PROTOCOL = "3-3-2-2-2"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    console.print(f"[bold]$ {' '.join(cmd)}[/]  (in {cwd})")
    done = subprocess.run(cmd, cwd=cwd, env=env)
    if done.returncode != 0:
        raise CcnfError(f"command failed with exit code {done.returncode}: {' '.join(cmd)}",
                        where=str(cwd), fix="read the output above; fix, then re-run the script")


def _env(clone: Path) -> dict[str, str]:
    venv = REPO / ".venv" / "bin"
    if not (venv / "python").is_file():
        raise CcnfError(f"no virtual environment at {venv.parent}", fix="bash scripts/setup.sh")
    env = dict(os.environ)
    env["PATH"] = f"{venv}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(clone)  # the clone's code (same commit), not the editable install
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prepare_clone(workdir: Path, root: Path, protocol: str) -> Path:
    """A clone of HEAD at ``workdir`` pointed at ``root``; reused (fetched to HEAD) if there."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    env = _env(workdir)
    if not (workdir / ".git").is_dir():
        if workdir.exists():
            shutil.rmtree(workdir)
        _run(["git", "clone", "--quiet", str(REPO), str(workdir)], REPO, env)
    else:
        _run(["git", "fetch", "--quiet", str(REPO), head], workdir, env)
        _run(["git", "reset", "--quiet", "--hard", head], workdir, env)
    for key, value in (("user.name", "ccnf-industrial12"), ("user.email", "ccnf@localhost")):
        _run(["git", "config", key, value], workdir, env)
    _run(["git", "config", "gc.auto", "0"], workdir, env)
    _run(["ccnf", "data", "use", "folder", "--root", str(root), "--protocol", protocol],
         workdir, env)
    _run(["git", "commit", "--quiet", "-am", f"industrial12, protocol {protocol}"], workdir, env)
    return workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="experiment ids (default: subsets.industrial12)")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--protocol", default=DEFAULT_PROTOCOL)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ccnf-industrial12"))
    ap.add_argument("--report", type=Path, default=REPO / "REPORT.md")
    ap.add_argument("--commits", type=int, default=3,
                    help="how many of the clone's newest commits to read records from")
    ap.add_argument("--render-only", action="store_true",
                    help="only re-render REPORT.md from the clone's existing records")
    args = ap.parse_args()
    root = args.root.resolve()
    if not root.is_dir():
        raise CcnfError(f"industrial12 not found at {root}",
                        fix="pass --root PATH (the folder with cookie/, magnetic_tile/, pcb_*/)")
    clone = args.workdir.resolve()
    if not args.render_only:
        prepare_clone(clone, root, args.protocol)
        env = _env(clone)
        cat = load_catalog(clone / "catalog.yaml", clone / "params.yaml")
        ids = args.ids or list(cat.subsets.get("industrial12", ()))
        if not ids:
            raise CcnfError("no experiments to run",
                            fix="name ids, or add subsets.industrial12 to catalog.yaml")
        _run(["dvc", "repro"], clone, env)
        timing = REPO / REPORT_DIR / "industrial12_timing.json"
        _run(["ccnf", "catalog", "run", *ids, "--jobs", str(args.jobs), "--timing",
              str(timing)], clone, env)
    cat = load_catalog(clone / "catalog.yaml", clone / "params.yaml")
    params = load_params(clone / "params.yaml")
    spec = ReportSpec(
        block="industrial12", roles=cat.targets, headline=params.score.headline,
        strategies=cat.subsets.get("strategies", ()),
        data=f"industrial12 (real images, {root.name}, protocol {params.data.protocol}: "
        + ", ".join("[" + ", ".join(t) + "]" for t in params.split) + ")",
    )
    # the clone's records and those archived in main (an earlier clone's, another machine's)
    archive = REPO / spec.records_file
    archived = load_archive(archive)
    # a clone reset to a newer commit keeps its earlier commits' experiments off HEAD's history
    live = load_records(clone, args.commits)
    records = merge(live + off_history_records(clone, live), archived)
    # the subset's rows always (rows without a record keep their committed figures, marked),
    # any others named, and every row the archive holds
    rows = rows_to_show(
        match_records(cat, records),
        {*cat.subsets.get("industrial12", ()), *args.ids, cat.reference}, archived)
    plots = write_report(rows, cat.reference, args.report, REPO / REPORT_DIR, spec=spec)
    save_archive(archive, rows, records)
    done = sum(r.record is not None for r in rows)
    console.print(f"{args.report}: industrial12 block from {done}/{len(rows)} records; "
                  f"{len(plots)} plot(s)")


if __name__ == "__main__":
    try:
        main()
    except CcnfError as err:
        console.print(f"[red]error:[/] {err}")
        sys.exit(1)
