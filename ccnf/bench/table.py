"""``bench.json`` printed as rich tables: the figures, then each target and whether it is met."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ccnf.bench.harness import EXPERIMENT


def _fmt(fig: Any, digits: int = 1) -> str:
    if fig is None:
        return "-"
    if isinstance(fig, dict):
        lo, hi = fig["min"], fig["max"]
        return f"{fig['median']:.{digits}f}  [{lo:.{digits}f}-{hi:.{digits}f}]"
    return f"{fig:.{digits}f}"


def render(result: dict[str, Any], console: Console) -> None:
    """Print bench.json as rich tables."""
    dev = result["device"]
    t = Table(
        title=f"ccnf bench on {dev['type']} ({dev['name']}; torch threads: "
        f"{result['threads']['extraction']} extraction, {result['threads']['flow']} flow), "
        f"median [min-max] of {result['repeats']} runs",
    )
    t.add_column("what")
    t.add_column("figure", justify="right")
    t.add_column("unit")
    ext = result.get("extraction")
    if ext:
        t.add_row(
            f"extract stage ({ext['images']} images)", _fmt(ext["stage_images_per_s"]), "images/s"
        )
        t.add_row(
            f"backbone forward (batch {ext['batch_size']})",
            _fmt(ext["forward_images_per_s"]),
            "images/s",
        )
        t.add_row("backbone build", _fmt(ext["backbone_build_s"], 2), "s")
    tr = result.get("training")
    if tr:
        t.add_row(
            f"flow training step ({tr['vectors_per_step']} vectors)", _fmt(tr["step_ms"]), "ms"
        )
        t.add_row("flow training", _fmt(tr["vectors_per_s"], 0), "vectors/s")
        t.add_row(
            f"  per coupling block (x{tr['n_couplings']})",
            _fmt(tr["vectors_per_s_per_coupling"], 0),
            "vectors/s",
        )
        task = tr["task"]
        t.add_row(
            f"full task {task['task']} ({task['steps']:.0f} steps, {task['features']})",
            _fmt(task["seconds"]),
            "s",
        )
        if "ms_per_step" in task:  # bench.json files of earlier versions lack it
            t.add_row("  of it, one optimizer step", _fmt(task["ms_per_step"], 2), "ms")
    cat = result.get("catalog")
    if cat:
        t.add_row(
            f"catalog: {cat['steps']:,} optimizer steps ({cat['experiments']} experiments) on "
            f"{cat['workers']} workers, at the least", f"{cat['minutes']:.1f}", "min",
        )
    inf = result.get("inference")
    if inf:
        t.add_row("inference: backbone", _fmt(inf["backbone_ms"], 2), "ms/image")
        for key, label in (
            ("flow_ms", "flow"),
            ("scoring_ms", "scoring"),
            ("postprocess_ms", "map post-processing"),
            ("score_images_ms", "score_images (all of it)"),
        ):
            t.add_row(f"inference: {label}", _fmt(inf.get(key), 2), "ms/image")
    cs = result.get("class_selection")
    if cs:
        for k in (key for key in cs if key.isdigit()):
            t.add_row(
                f"class selection, {k} classes: likelihood",
                _fmt(cs[k]["likelihood_ms"], 1),
                "ms/image",
            )
            t.add_row(
                f"class selection, {k} classes: prototype",
                _fmt(cs[k]["prototype_ms"], 1),
                "ms/image",
            )
    mem = result.get("memory", {})
    for stage, row in (mem.get("stages") or {}).items():
        t.add_row(
            f"stage {stage}: peak RSS / wall",
            f"{row['max_rss_mb']:.0f} / {row['seconds']:.1f}",
            "MB / s",
        )
    if mem.get("feature_cache"):
        t.add_row("feature cache on disk", f"{mem['feature_cache']['disk_mb']:.0f}", "MB")
    e2e = result.get("e2e")
    if e2e:
        t.add_row("dvc repro (from nothing)", f"{e2e['repro']['seconds']:.1f}", "s")
        t.add_row(f"dvc exp run -S {EXPERIMENT}", f"{e2e['experiment']['seconds']:.1f}", "s")
    console.print(t)
    tt = Table(title="targets")
    for col in ("ratio", "value", "target", "met"):
        tt.add_column(col)
    for name, row in result["targets"].items():
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "not measured"}[row["met"]]
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        tt.add_row(name, value, row["target"], met)
    console.print(tt)
    for name, err in result.get("errors", {}).items():
        console.print(f"[red]{name} failed:[/] {err}")
    console.print(f"bench took {result['seconds']:.0f} s")
