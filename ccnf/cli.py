"""The ``ccnf`` command line: what users run outside DVC.

    ccnf params                 validate params.yaml, show the data, split and task chain
    ccnf deps [--check|--write] the code each dvc.yaml stage runs vs the deps it lists
    ccnf data use SOURCE ...    point the study at a dataset and a protocol (rewrites params)
    ccnf data protocols         the protocols that fit the current classes
    ccnf data synth OUT_DIR     generate the embedded synthetic dataset
    ccnf data check             difficulty check: training-free 1-NN patch memory AUROC
    ccnf info                   the current run's results in the terminal
    ccnf score IMAGE --cls C    score one image with a trained checkpoint
    ccnf report readme|check    write / verify the README's result tables
    ccnf catalog list|run|table|report|check   the variant catalog through DVC
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ccnf.config import Params, load_params
from ccnf.console import console, report_user_errors
from ccnf.errors import CcnfError
from ccnf.names import SCORES

if TYPE_CHECKING:
    from ccnf.catalog.schema import Catalog

app = typer.Typer(
    help="Continual Conditional Normalizing Flows: study tools.", no_args_is_help=True
)
data_app = typer.Typer(help="The dataset: generate, check difficulty.", no_args_is_help=True)
report_app = typer.Typer(help="Result tables in README.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(report_app, name="report")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file")


def _show_plan(p: Params, title: str) -> None:
    """What the pipeline will run for these params: data, split, task chain, stages."""
    d = p.data
    listed = "the source's own list" if d.classes is None else "data.classes"
    n = len(p.classes)
    console.print(
        f"data: [bold]{d.source}[/] under {d.root}; {n} class{'es' if n != 1 else ''} "
        f"({listed}) cut by protocol [bold]{d.protocol}[/] into {len(p.split)} task(s)"
    )
    synth = ", ".join(f"synth@{g}" for g in d.generate)
    tasks = p.task_names
    span = tasks[0] if len(tasks) == 1 else f"{tasks[0]}..{tasks[-1]}"
    console.print(
        f"stages: {synth + ', ' if synth else ''}prepare, extract, init, train@{span}, "
        f"evaluate@{span}, aggregate"
        + ("" if synth else " (no synth: the images are on disk)")
    )
    table = Table(title=title)
    table.add_column("task")
    table.add_column("classes")
    table.add_column("starts from")
    for name, task_classes in zip(tasks, p.split, strict=True):
        table.add_row(name, ", ".join(task_classes), p.tasks[name].prev)
    console.print(table)


@app.command("params")
@report_user_errors
def params_cmd(params: Path = PARAMS) -> None:
    """Validate params.yaml and show what will run: data, split, task chain, stages."""
    from ccnf.models import check_params

    p = load_params(params)
    check_params(p)  # the model supports the strategy, class selection and headline
    _show_plan(p, f"{params}: valid ({p.data.source} data, model {p.model.kind})")


@app.command("deps")
@report_user_errors
def deps(
    dvc_yaml: Path = typer.Option(Path("dvc.yaml"), "--dvc-yaml", help="pipeline file"),
    check: bool = typer.Option(False, "--check", help="exit 1 when a stage misses a module"),
    write: bool = typer.Option(False, "--write", help="rewrite every stage's code deps in "
                               "dvc.yaml to exactly what it runs"),
) -> None:
    """The code each stage of dvc.yaml runs (its script's imports, followed through the
    package) next to the deps it lists: what to write under a stage's deps (--write does)."""
    from ccnf.atomic import write_text
    from ccnf.depgraph import (
        minimal_deps,
        module_files,
        rewrite_code_deps,
        stage_code,
        uncovered,
    )

    root = dvc_yaml.resolve().parent
    if write:
        code = {name: minimal_deps(root, module_files(root, [script]))
                for name, (script, _) in stage_code(dvc_yaml).items()}
        write_text(dvc_yaml, rewrite_code_deps(dvc_yaml.read_text(), code))
        console.print(f"{dvc_yaml}: code deps of {len(code)} stages rewritten")

    missing_any = False
    for name, (script, listed) in stage_code(dvc_yaml).items():
        files = module_files(root, [script])
        missing = uncovered(files, listed)
        missing_any |= bool(missing)
        state = f"[red]misses {len(missing)}[/]" if missing else "[green]covered[/]"
        console.print(f"[bold]{name}[/] ({script}, {len(files)} files): {state}")
        for path in missing:
            console.print(f"  not in deps: {path}")
        if missing:
            console.print("  code deps that cover it exactly:")
            for dep in minimal_deps(root, files):
                console.print(f"    - {dep}")
    if check and missing_any:
        raise typer.Exit(1)


@data_app.command("use")
@report_user_errors
def data_use(
    source: str = typer.Argument(
        None, help="synthetic | mvtec | visa | folder (any MVTec-layout root); default: current"
    ),
    root: str = typer.Option(
        None, "--root", help="dataset folder (relative paths: to the repository)"
    ),
    protocol: str = typer.Option(
        None, "--protocol", "-p",
        help="AxB (A tasks of B classes), A-B-C... (task sizes in order), one-per-task, "
        "all-in-one; default: current",
    ),
    classes: str = typer.Option(
        None, "--classes",
        help="comma-separated class order (default: the source's list; folder: its class "
        "folders, alphabetical)",
    ),
    print_overrides: bool = typer.Option(
        False, "--overrides",
        help="print the same change as a dvc exp run -S command; params.yaml is not touched",
    ),
    params: Path = PARAMS,
) -> None:
    """Point the study at a dataset and a protocol: rewrites data.* and the tasks chain.

    Comments and every other key of params.yaml stay; the result is validated before it is
    written. Then run: dvc repro (or dvc exp run).
    """
    import yaml

    from ccnf.data.use import choose, overrides, overrides_command, rewrite_params

    if not params.is_file():
        raise CcnfError(f"params file not found: {params}",
                        fix="run from the repository root, or pass --params PATH")
    raw = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    wanted = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    choice = choose(raw, source=source, root=root, protocol=protocol, classes=wanted,
                    base=params.resolve().parent)
    if print_overrides:
        typer.echo(overrides_command(overrides(raw, choice)))
        return
    p = rewrite_params(params, choice)
    _show_plan(p, f"{params} rewritten")
    console.print("next: dvc repro (or dvc exp run)")


@data_app.command("protocols")
@report_user_errors
def data_protocols(
    n: int = typer.Option(None, "--n", min=1, help="number of classes (default: params)"),
    params: Path = PARAMS,
) -> None:
    """The protocols that fit N classes, with the analogues of the MVTec AD protocols."""
    from ccnf.data.split import ALL_IN_ONE, MVTEC_PROTOCOLS, ONE_PER_TASK, analogues, fitting

    if n is None:
        n = len(load_params(params).classes)
    meaning: dict[str, list[str]] = {
        ONE_PER_TASK: [f"= {n}x1, one class per task"],
        ALL_IN_ONE: [f"= 1x{n}, every class in one task"],
    }
    for g in fitting(n):
        tasks, per = g.split("x")
        meaning.setdefault(g, []).append(f"{tasks} task(s) of {per} class(es)")
    for mvtec, name in analogues(n).items():
        meaning.setdefault(name, []).append(
            f"plays the part of MVTec AD's {mvtec} ({MVTEC_PROTOCOLS[mvtec]})"
        )
    meaning["A-B-C..."] = [f"any task sizes, in order, that sum to {n}"]
    table = Table(title=f"protocols for {n} classes (ccnf data use --protocol NAME)")
    table.add_column("protocol")
    table.add_column("means")
    for name, lines in meaning.items():
        table.add_row(name, "; ".join(lines))
    console.print(table)


@data_app.command("synth")
@report_user_errors
def data_synth(out_dir: Path, params: Path = PARAMS) -> None:
    """Generate the synthetic MVTec-layout dataset into OUT_DIR (data.synthetic params)."""
    from ccnf.data.synthetic import generate

    summary = generate(out_dir, load_params(params).data.synthetic)
    console.print(f"wrote {out_dir}: {summary}")


@data_app.command("check")
@report_user_errors
def data_check(
    root: Path = typer.Option(None, help="MVTec-layout root (default: data.root)"),
    params: Path = PARAMS,
    out: Path = typer.Option(Path("metrics/data_check.json"), help="where to write the JSON"),
) -> None:
    """Training-free per-class 1-NN patch memory on the dataset: is it a fair test bed?"""
    from ccnf.atomic import write_json
    from ccnf.data.calibration import knn_check

    p = load_params(params)
    report = knn_check(
        root or Path(p.data.root),
        p.classes,
        source=p.data.source,
        image_size=p.data.image_size,
        mask_size=p.data.mask_size,
        backbone_cfg=p.backbone,
    )
    console.print(report.to_table())
    write_json(out, report.to_dict())
    console.print(f"written to {out}")


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


@app.command("info")
@report_user_errors
def info(
    metrics: Path = typer.Option(Path("metrics"), help="metrics directory"),
    params: Path = PARAMS,
) -> None:
    """Print the current run's summary, R matrix and per-class table (any model kind)."""
    from ccnf.report import CONTINUAL_COLUMNS, SUMMARY_COLUMNS, load_metrics, stale_scores
    from ccnf.store import read_json

    headline = _headline(params)
    summary, per_class = load_metrics(metrics)
    scores = [s for s in SCORES if s in summary]
    # the continual figures the first table does not hold, with terminal-width labels (README
    # and summary.json spell them out)
    short = {"image_auroc_over_classes": "image, class mean",
             "pixel_auroc_over_classes": "pixel, class mean",
             "image_step_average": "A-image AUROC", "image_diagonal": "image diagonal",
             "image_bwt": "image BWT", "pixel_step_average": "A-pixel AUROC",
             "pixel_bwt": "pixel BWT"}
    continual = tuple((k, short[k]) for k, _ in CONTINUAL_COLUMNS if k in short)
    for title, columns in (
        ("final averages (after the last task) and forgetting, task-aware", SUMMARY_COLUMNS),
        ("continual figures, task-aware: class mean = after the last task over classes, not "
         "tasks (papers' per-class tables; differs with unequal tasks); A- = mean over steps "
         "of the seen-task average (what IUF and CDAD print; the table above is after the "
         "last task); diagonal = each task "
         "right after it was learned; BWT = backward transfer, the mean change of each earlier "
         "task from then to the end", continual),
    ):
        table = Table(title=title)
        table.add_column("score")
        for _, label in columns:  # numbers are never cut; headers wrap instead
            table.add_column(label, justify="right", min_width=7)
        for s in scores:
            table.add_row(s, *(_fmt4(summary[s].get(k)) for k, _ in columns))
        console.print(table)
    mem = summary.get("memory")
    if mem:
        console.print(
            f"memory: the final model keeps {mem['bytes'] / 1024:.1f} KB ({mem['values']} "
            f"values); each later task added {mem['added_bytes_per_task'] / 1024:.1f} KB "
            f"({mem['added_bytes_per_class'] / 1024:.1f} KB per class); stored training images "
            f"of earlier tasks: {mem['stored_images']}")
    leaky = summary.get("test_selected_leaky")
    if leaky:
        console.print(
            f"[yellow]LEAKY (eval.test_selected, model chosen on the test set, as UCAD, CDAD "
            f"and IUF do; not our figure):[/] {leaky['score']} image / pixel AUROC after the "
            f"last task {leaky['image_auroc']:.4f} / {leaky['pixel_auroc']:.4f}, mean over "
            f"steps {leaky['image_step_average']:.4f} / {leaky['pixel_step_average']:.4f}")
    th = Table(title="automatic thresholds next to their chance levels (task-aware)")
    for col in ("score", "image AP", "AP of a random ranking", "F1 @ mean+k*std",
                "F1 @ percentile", "F1 of flagging every image",
                "normal images flagged @ mean+k*std"):
        th.add_column(col, justify="left" if col == "score" else "right")
    for s in scores:
        v = summary[s]
        th.add_row(s, *(_fmt4(v.get(k)) for k in (
            "image_ap", "image_ap_chance", "image_f1_kstd", "image_f1_pct", "image_f1_all",
            "image_normal_flagged_kstd")))
    console.print(th)
    mats = read_json(metrics / "matrices.json", what="metrics file")
    r = mats[headline]["image_auroc"]
    rt = Table(title=f"R[t][j], {headline} image AUROC (rows: after task t; cols: task j)")
    rt.add_column("after")
    for j in range(len(r)):
        rt.add_column(f"t{j}", justify="right")
    for t, row in enumerate(r):
        rt.add_row(f"t{t}", *(_fmt(v) for v in row))
    console.print(rt)
    ct = Table(title="per class, final model (stale: calibration threshold flags most normal "
               "test images)")
    cols = ["task", "class", f"{headline} image", f"{headline} pixel", f"{headline} AUPRO",
            *(f"{s} image" for s in scores if s != headline), "stale"]
    for col in cols:
        ct.add_column(col, justify="left" if col in ("class", "stale") else "right")
    for cls, m in per_class.items():
        h = m[headline]
        ct.add_row(
            f"t{m['task']}", cls, _fmt(h["image_auroc"]), _fmt(h["pixel_auroc"]),
            _fmt(h["aupro"]), *(_fmt(m[s]["image_auroc"]) for s in scores if s != headline),
            ", ".join(stale_scores(m)) or "",
        )
    console.print(ct)


def _fmt4(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _headline(params: Path) -> str:
    """``score.headline`` of the params (nf when there is no params file)."""
    return load_params(params).score.headline if params.is_file() else "nf"


@app.command("score")
@report_user_errors
def score(
    image: Path,
    cls: str = typer.Option(..., "--cls", help="class of the image (oracle selection)"),
    model_dir: Path = typer.Option(None, "--model", help="checkpoint dir (default: last task)"),
    out: Path = typer.Option(None, help="write the headline score's anomaly map here (PNG)"),
    params: Path = PARAMS,
) -> None:
    """Score one image with a trained checkpoint (any model kind): every image score, its
    calibrated value (z against the class's normal training images), and the anomaly map."""
    import numpy as np
    import torch

    from ccnf.backbone import Backbone
    from ccnf.data.images import load_image
    from ccnf.features import neighbourhood
    from ccnf.models import read_checkpoint, restore_model
    from ccnf.scoring import (
        assemble,
        calibration_record,
        fusion_stats_of,
        image_scores,
        pixel_maps,
        stack_stats,
    )

    p = load_params(params)
    model_dir = model_dir or Path("models") / p.task_names[-1]
    ckpt = read_checkpoint(model_dir)
    if cls not in ckpt["classes"]:
        raise CcnfError(
            f"class '{cls}' is not known to {model_dir}",
            fix=f"use one of: {', '.join(ckpt['classes'])}",
        )
    # no feature cache needed: the checkpoint's own spec rebuilds the model
    model = restore_model(ckpt, p, None, torch.device("cpu"), where=str(model_dir / "model.pt"))
    pixels = load_image(image, p.data.image_size)
    with torch.no_grad():
        feats = Backbone(p.backbone)(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    feats = neighbourhood([f.float() for f in feats], p.features.neighbourhood)
    patches = model.patch_scores(feats, [cls], 1)
    stats = calibration_record(ckpt["calibration"][cls], p.score, p.data.mask_size, cls=cls)
    st = stack_stats({cls: stats}, [cls])
    raw = assemble(patches, p.score, p.data.mask_size, fusion_stats_of(st))
    imgs = image_scores(raw, stats, p.score.alpha)
    calibrated = image_scores(raw, stats, p.score.alpha, calibrated=True)
    table = Table(title=f"{image} as '{cls}'")
    table.add_column("score")
    table.add_column("image score", justify="right")
    table.add_column("calibrated (z)", justify="right")
    for name, v in imgs.items():
        table.add_row(name, f"{v[0]:.4f}", f"{calibrated[name][0]:+.2f}")
    console.print(table)
    if out is not None:
        from ccnf.plots import GalleryRow, plot_gallery

        headline = p.score.headline if p.score.headline in imgs else "nf"
        amap = pixel_maps(raw, stats, p.score.alpha)[headline][0]
        row = GalleryRow(
            image=load_image(image, p.data.mask_size),
            mask=np.zeros(amap.shape, dtype=bool),
            anomaly_map=amap,
            caption=f"{image.name} as {cls}: {headline} {imgs[headline][0]:.3f}",
        )
        plot_gallery([row], out, "ccnf score")
        console.print(f"anomaly map written to {out}")


@report_app.command("readme")
@report_user_errors
def report_readme(
    readme: Path = typer.Option(Path("README.md")),
    metrics: Path = typer.Option(Path("metrics")),
) -> None:
    """Rewrite README's results block from metrics/."""
    from ccnf.report import update_readme

    update_readme(readme, metrics, _headline(PARAMS.default))
    console.print(f"{readme}: results block updated from {metrics}")


@report_app.command("check")
@report_user_errors
def report_check(
    readme: Path = typer.Option(Path("README.md")),
    metrics: Path = typer.Option(Path("metrics")),
    tolerance: float = typer.Option(0.002, help="largest allowed absolute difference"),
) -> None:
    """Fail if README's results differ from metrics/ by more than the tolerance."""
    from ccnf.report import check_readme

    problems = check_readme(readme, metrics, tolerance, _headline(PARAMS.default))
    if problems:
        raise CcnfError(
            f"README results differ from fresh metrics (tolerance {tolerance}):\n  "
            + "\n  ".join(problems),
            fix="if the change is intended: ccnf report readme, then commit README.md",
        )
    console.print(f"README results match {metrics} within {tolerance}")


# ----------------------------------------------------------------------------- catalog
# The variant catalog (catalog.yaml): ccnf/catalog/ and ccnf/study_report.py hold the logic.

catalog_app = typer.Typer(
    help="The variant catalog (catalog.yaml): list, run through DVC, tabulate, check.",
    no_args_is_help=True,
)
app.add_typer(catalog_app, name="catalog")
CATALOG = typer.Option(Path("catalog.yaml"), "--catalog", help="catalog file")


COMMITS = typer.Option(
    10, "--commits", min=1,
    help="look for experiments on the last N commits (newest wins): DVC files experiments "
    "under their baseline commit, and a later commit would hide them")


def _catalog_rows(catalog_path: Path, params: Path, commits: int = 10) -> tuple:
    """(catalog, its rows, every record read): DVC's records of the last ``commits`` commits
    and those archived beside REPORT.md (docs/report/catalog_records.json)."""
    from ccnf.catalog import load_catalog, match_records
    from ccnf.catalog.archive import load_with_archive
    from ccnf.study_report import ReportSpec

    cat = load_catalog(catalog_path, params)
    records = load_with_archive(Path.cwd(), commits, ReportSpec().records_file)
    return cat, match_records(cat, records), records


def _report_spec(cat: object, params: Path) -> object:
    """How REPORT.md's synthetic block reads the records: the catalog's target roles, the
    params' headline score and anomalib's figures on the same data."""
    from ccnf.study_report import ReportSpec, read_peers

    return ReportSpec(roles=cat.targets, headline=_headline(params),  # type: ignore[attr-defined]
                      peers=read_peers(),
                      strategies=cat.subsets.get("strategies", ()))  # type: ignore[attr-defined]


@catalog_app.command("list")
@report_user_errors
def catalog_list(catalog: Path = CATALOG, params: Path = PARAMS) -> None:
    """Every catalog experiment: id, what it tests, its overrides, the note's MVTec figure."""
    from ccnf.catalog import load_catalog

    cat = load_catalog(catalog, params)
    table = Table(title=f"{catalog}: {len(cat.experiments)} experiments (valid against {params})")
    # ids are folded, never cut with an ellipsis (they are copied into commands); the note's
    # figures keep their width, so a narrow terminal narrows the description first
    table.add_column("id", overflow="fold", min_width=15)
    table.add_column("description", overflow="fold", ratio=2, min_width=12)
    table.add_column("overrides (dvc exp run -S)", overflow="fold", ratio=1, min_width=16)
    table.add_column("note MVTec img/pix", no_wrap=True, min_width=15)
    for exp in cat.experiments.values():
        tag = " (reference)" if exp.id == cat.reference else ""
        tag += " [CI]" if exp.id in cat.ci_subset else ""
        note = f"{exp.note.image_auroc:.4f} / {exp.note.pixel_auroc:.4f}" if exp.note else ""
        shown = [f"protocol {exp.protocol}"] if exp.protocol else []
        table.add_row(exp.id + tag, exp.description,
                      "\n".join([*shown, *exp.overrides]) or "(none)", note)
    console.print(table)


def _subset_ids(cat: Catalog, subset: str | None) -> list[str]:
    """The ids of catalog.yaml's subset ``subset`` (none for None); an unknown name is an error."""
    if subset is None:
        return []
    if subset not in cat.subsets:
        raise CcnfError(f"catalog.yaml has no subset '{subset}'",
                        fix=f"use one of: {', '.join(cat.subsets) or '(none defined)'}")
    return list(cat.subsets[subset])


@catalog_app.command("run")
@report_user_errors
def catalog_run(
    ids: list[str] = typer.Argument(None, help="experiment ids (ccnf catalog list)"),
    all_: bool = typer.Option(False, "--all", help="every experiment of the catalog"),
    ci: bool = typer.Option(False, "--ci", help="add the catalog's ci_subset"),
    subset: str = typer.Option(
        None, "--subset", help="add a named set of catalog.yaml's subsets (e.g. industrial12)"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="parallel DVC queue workers"),
    mode: str = typer.Option(
        "auto", help="temp: `dvc exp run --temp` one at a time; queue: `dvc exp run --queue` "
        "then `dvc queue start -j N`; auto: temp for 1 job, queue for more"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the DVC commands only"),
    force: bool = typer.Option(
        False, "--force", help="re-run experiments that already finished on this commit "
        "(default: keep them, so re-running a command after a crash finishes the rest)"),
    timing: Path = typer.Option(
        None, help="write the wall time here (default with --all: "
        "docs/report/catalog_timing.json)"),
    seed: list[int] = typer.Option(
        None, "--seed", help="run each experiment at this seed instead, named ID-seedN "
        "(repeat for several: --seed 1 --seed 2); replicates, not catalog rows"),
    catalog: Path = CATALOG,
    params: Path = PARAMS,
) -> None:
    """Run experiments through DVC; those already finished on this commit are kept.

    An experiment that finished on HEAD with the catalog's params is skipped (so the same
    command, run again after a crash or a dead queue worker, finishes the rest); any other
    earlier experiment of the same id is replaced. --force replaces finished ones too.
    With --seed the replicates ID-seedN run instead, kept and replaced the same way.
    """
    import datetime
    import os
    import time

    from ccnf.atomic import write_json
    from ccnf.catalog import (
        check_workspace,
        finished_ids,
        load_catalog,
        remove_existing,
        run_queue,
        run_sequential,
    )
    from ccnf.catalog.runner import head_commit
    from ccnf.study_report import TIMING_FILE

    cat = load_catalog(catalog, params)
    exps = cat.select([*(ids or []), *_subset_ids(cat, subset)], all_=all_, ci=ci)
    if seed:
        exps = [e.with_seed(n) for e in exps for n in dict.fromkeys(seed)]
    if mode not in ("auto", "temp", "queue"):
        raise CcnfError(f"unknown --mode '{mode}'", fix="use auto, temp or queue")
    if mode == "auto":
        mode = "queue" if jobs > 1 else "temp"
    if mode == "temp" and jobs > 1:
        raise CcnfError("--mode temp runs one experiment at a time",
                        fix="use --mode queue for --jobs > 1")
    if dry_run:
        for exp in exps:
            typer.echo(" ".join(exp.dvc_command(queue=mode == "queue", temp=mode == "temp")))
        if mode == "queue":
            typer.echo(f"dvc queue start -j {jobs}")
        return
    cwd = Path.cwd()
    check_workspace(cwd)
    done = [] if force else finished_ids(cat, exps, cwd)
    if done:
        console.print(f"already finished on this commit, kept: {', '.join(done)} "
                      "(--force re-runs them)")
        exps = [e for e in exps if e.id not in done]
        if not exps:
            console.print("nothing left to run")
            return
    remove_existing([e.id for e in exps], cwd, console.print, queue=mode == "queue")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    if mode == "queue":
        outcomes = run_queue(exps, cwd, jobs, console.print)
    else:
        outcomes = run_sequential(exps, cwd, console.print)
    wall = time.perf_counter() - t0
    summary = Table(title=f"{len(exps)} experiment(s), {wall / 60:.1f} min ({mode}, {jobs} job(s))")
    for col in ("id", "seconds", "stages run", "result"):
        summary.add_column(col)
    for o in outcomes:
        summary.add_row(o.id, f"{o.seconds:.0f}", str(len(o.stages_run)),
                        "ok" if o.ok else "[red]FAILED[/]")
    console.print(summary)
    target = timing if timing is not None else (TIMING_FILE if all_ else None)
    if target is not None:
        commit = head_commit(cwd)
        write_json(target, {
            "ids": [e.id for e in exps],
            "kept_finished": done,  # finished before this run, not re-run (see --force)
            "all": all_,
            "mode": mode,
            "jobs": jobs,
            "wall_s": round(wall, 1),
            "cpus": os.cpu_count(),
            "load_avg_start": None if load is None else round(load, 2),
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "experiments": {o.id: {"seconds": round(o.seconds, 1), "stages_run": o.stages_run,
                                   "ok": o.ok} for o in outcomes},
        })
        console.print(f"wall time recorded in {target}")
    shared = {o.id: o.shared_stages_run for o in outcomes if o.shared_stages_run}
    if shared:
        console.print(f"[yellow]warning:[/] shared stages re-ran (features not reused): {shared}")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise CcnfError(
            f"{len(failed)} experiment(s) failed: {', '.join(o.id for o in failed)}\n"
            + "\n".join(f"--- {o.id}:\n{o.tail[-1500:]}" for o in failed),
            fix="fix the cause, then run the same command again: finished experiments are "
            "kept and only these run",
        )


@catalog_app.command("table")
@report_user_errors
def catalog_table(
    out: Path = typer.Option(None, help="write the markdown here instead of stdout"),
    commits: int = COMMITS,
    catalog: Path = CATALOG,
    params: Path = PARAMS,
) -> None:
    """The comparison tables (markdown) from DVC's experiment records (dvc exp show --json)
    and those archived in docs/report/catalog_records.json."""
    from ccnf.atomic import write_text

    cat, rows, _ = _catalog_rows(catalog, params, commits)
    text = _report_spec(cat, params).table(rows, cat.reference) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_text(out, text)
        console.print(f"tables written to {out}")


@catalog_app.command("report")
@report_user_errors
def catalog_report(
    report: Path = typer.Option(Path("REPORT.md"), help="the report to create or update"),
    plots: bool = typer.Option(True, help="also redraw the plots under docs/report/"),
    commits: int = COMMITS,
    catalog: Path = CATALOG,
    params: Path = PARAMS,
) -> None:
    """Rewrite REPORT.md's generated blocks (tables, plots, timing); the rest is kept."""
    from ccnf.catalog.archive import save_archive
    from ccnf.study_report import write_report

    cat, rows, records = _catalog_rows(catalog, params, commits)
    spec = _report_spec(cat, params)
    written = write_report(rows, cat.reference, report, make_plots=plots, spec=spec)
    save_archive(spec.records_file, rows, records)  # type: ignore[attr-defined]
    done = sum(r.record is not None for r in rows)
    console.print(f"{report}: {done}/{len(rows)} experiments with results; "
                  f"{len(written)} plot(s) written; their records kept in "
                  f"{spec.records_file}")  # type: ignore[attr-defined]


@catalog_app.command("cost")
@report_user_errors
def catalog_cost(
    ids: list[str] = typer.Argument(None, help="only these experiments (default: all)"),
    ci: bool = typer.Option(False, "--ci", help="the catalog's ci_subset"),
    subset: str = typer.Option(
        None, "--subset", help="a named set of catalog.yaml's subsets (e.g. strategies)"),
    workers: int = typer.Option(2, min=1, help="runs side by side (ccnf catalog run --jobs)"),
    minutes: float = typer.Option(60.0, min=0.1,
                                  help="the time budget to hold the steps against"),
    step_ms: float = typer.Option(
        None, help="ms per optimizer step on one worker (`ccnf bench`: a task's seconds / "
        "steps); given, the least time the steps take is printed too"),
    manifest: Path = typer.Option(
        None, help="data/manifest.json of a data set on disk (synthetic data needs none)"),
    catalog: Path = CATALOG,
    params: Path = PARAMS,
) -> None:
    """The fewest optimizer steps of each experiment and of the whole catalog, and the step
    time a budget allows (training alone: evaluation and stage start-up come on top)."""
    from collections import Counter

    from ccnf.catalog import load_catalog, read_yaml
    from ccnf.catalog.cost import experiment_steps, min_hours

    cat = load_catalog(catalog, params)
    named = [*(ids or []), *_subset_ids(cat, subset)]
    chosen = cat.select(named, ci=ci) if named or ci else list(cat.experiments.values())
    rows = experiment_steps(chosen, read_yaml(params, "params file"), manifest)
    total = sum(r.steps for r in rows)
    groups: Counter[tuple[str, str]] = Counter()
    count: Counter[tuple[str, str]] = Counter()
    for r in rows:
        groups[r.kind, r.strategy] += r.steps
        count[r.kind, r.strategy] += 1
    table = Table(title=f"optimizer steps of {len(rows)} experiment(s), at the least")
    for col in ("model.kind", "train.strategy", "experiments", "steps"):
        table.add_column(col, justify="right" if col in ("experiments", "steps") else "left")
    for key, steps in sorted(groups.items(), key=lambda kv: -kv[1]):
        table.add_row(*key, str(count[key]), f"{steps:,}")
    table.add_row("all", "", str(len(rows)), f"{total:,}", style="bold")
    console.print(table)
    if total == 0:
        console.print("no optimizer step: the chosen experiments train nothing")
        return
    allowed = minutes * 60e3 * workers / total
    console.print(f"{minutes:g} minutes with {workers} worker(s) allow at most "
                  f"[bold]{allowed:.1f} ms[/] per optimizer step")
    if step_ms is not None:
        hours = min_hours(total, step_ms, workers)
        verdict = "[green]fits[/]" if hours * 60 <= minutes else "[red]does not fit[/]"
        console.print(f"at {step_ms:g} ms per step the steps alone take at least "
                      f"[bold]{hours * 60:.1f} minutes[/] with {workers} worker(s): {verdict}")


@catalog_app.command("check")
@report_user_errors
def catalog_check(
    ids: list[str] = typer.Argument(None, help="only these experiments (default: all)"),
    ci: bool = typer.Option(False, "--ci", help="the catalog's ci_subset and its reference"),
    tolerance: float = typer.Option(0.002, help="largest allowed absolute difference"),
    report: Path = typer.Option(Path("REPORT.md")),
    commits: int = COMMITS,
    catalog: Path = CATALOG,
    params: Path = PARAMS,
) -> None:
    """Fail if REPORT.md's table differs from DVC's current experiment records."""
    from ccnf.study_report import check_report

    cat, rows, _ = _catalog_rows(catalog, params, commits)
    wanted: list[str] | None = None
    if ids or ci:
        wanted = [e.id for e in cat.select(ids or [], ci=ci)]
        if ci and cat.reference not in wanted:
            wanted.append(cat.reference)
    problems = check_report(rows, cat.reference, report, tolerance, wanted,
                            spec=_report_spec(cat, params))
    if problems:
        raise CcnfError(
            f"REPORT.md differs from the experiment records (tolerance {tolerance}), "
            f"{len(problems)} difference(s):\n  " + "\n  ".join(problems),
            fix="if the change is intended: ccnf catalog report, then commit REPORT.md",
        )
    n = len(wanted) if wanted is not None else len(rows)
    console.print(f"REPORT.md matches the experiment records of {n} experiment(s) "
                  f"within {tolerance}")



# ------------------------------------------------------------------------------- bench
@app.command("bench")
@report_user_errors
def bench(
    out: Path = typer.Option(Path("metrics/bench.json"), help="where to write the figures"),
    repeats: int = typer.Option(3, min=1, help="runs per figure (the median is reported)"),
    e2e: bool = typer.Option(
        True, "--e2e/--no-e2e", help="also time dvc repro vs dvc exp run in a snapshot (slow)"
    ),
    committed: bool = typer.Option(
        False, "--committed", help="end to end on the last commit, not the working tree"
    ),
    device: str = typer.Option(None, help="auto | cpu | cuda (default: params.yaml device)"),
    params: Path = PARAMS,
) -> None:
    """Time extraction, training, inference, class selection, memory and DVC runs."""
    import sys

    from ccnf.bench import render, run_bench

    result = run_bench(
        params, out, repeats=repeats, e2e=e2e, committed_only=committed,
        device_setting=device, console=console, command="ccnf " + " ".join(sys.argv[1:]),
    )
    render(result, console)
    console.print(f"written to {out}")
    if result["errors"]:
        raise CcnfError(
            f"bench sections failed: {', '.join(result['errors'])}",
            where=str(out),
            fix="see the messages above; the other figures were written",
        )


if __name__ == "__main__":
    app()
