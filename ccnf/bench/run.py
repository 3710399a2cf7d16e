"""``ccnf bench`` as a whole: every section in turn (a failed one does not lose the others'
figures), the memory summary and the targets, written atomically to ``bench.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import resource
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ccnf.atomic import write_json
from ccnf.bench.e2e import bench_e2e, stage_memory
from ccnf.bench.harness import CATALOG_WORKERS, dir_size, target
from ccnf.bench.selection import CLASS_COUNTS, bench_class_selection
from ccnf.bench.stages import bench_extraction, bench_inference, bench_training
from ccnf.config import load_params
from ccnf.data.manifest import Manifest
from ccnf.device import device_info, resolve_device
from ccnf.errors import CcnfError

SCHEMA = 1


@contextlib.contextmanager
def _section(name: str, errors: dict[str, str], console: Console) -> Iterator[None]:
    t0 = time.perf_counter()
    console.print(f"[bold]bench:[/] {name} ...")
    try:
        yield
    except Exception as err:  # a broken section must not lose the others' figures
        errors[name] = f"{type(err).__name__}: {err}"
        console.print(f"[red]bench: {name} failed:[/] {errors[name]}")
        if not isinstance(err, CcnfError):
            console.print(traceback.format_exc(), markup=False, highlight=False)
    finally:
        console.print(f"[dim]bench: {name} took {time.perf_counter() - t0:.1f} s[/]")


def catalog_cost(
    catalog: Path, params_path: Path, manifest_path: Path, training: dict[str, Any]
) -> dict[str, Any]:
    """The least time the catalog's optimizer steps take: its step count (``ccnf catalog
    cost``) x the measured task's median ms per step / :data:`CATALOG_WORKERS`."""
    from ccnf.catalog import load_catalog, read_yaml
    from ccnf.catalog.cost import experiment_steps, min_hours

    cat = load_catalog(catalog, params_path)
    rows = experiment_steps(list(cat.experiments.values()), read_yaml(params_path, "params file"),
                            manifest_path)
    steps = sum(r.steps for r in rows)
    ms = training["task"]["ms_per_step"]["median"]
    return {
        "experiments": len(rows),
        "steps": steps,
        "ms_per_step": ms,
        "workers": CATALOG_WORKERS,
        "minutes": round(60 * min_hours(steps, ms, CATALOG_WORKERS), 2),
    }


def run_bench(
    params_path: Path = Path("params.yaml"),
    out: Path = Path("metrics/bench.json"),
    *,
    repo: Path = Path("."),
    manifest_path: Path | None = None,
    features: Path | None = None,
    repeats: int = 3,
    e2e: bool = True,
    committed_only: bool = False,
    class_counts: tuple[int, ...] = CLASS_COUNTS,
    device_setting: str | None = None,
    console: Console | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run every section, write ``out`` atomically, return what was written."""
    console = console or Console(stderr=True)
    if repeats < 1:
        raise CcnfError(f"--repeats must be >= 1 (got {repeats})")
    started = time.perf_counter()
    params = load_params(params_path)
    device = resolve_device(device_setting or params.device)
    repo = Path(repo)
    manifest_path = manifest_path or repo / "data" / "manifest.json"
    manifest = Manifest.load(manifest_path)
    features = repo / "features" if features is None else features
    full_features = features if (features / "meta.json").is_file() else None
    errors: dict[str, str] = {}
    # the stages' thread counts: extract runs with torch's default, init/train/evaluate with
    # params.threads (when the params have it); each section runs as its stage does
    extract_threads = torch.get_num_threads()
    flow_threads = int(getattr(params, "threads", extract_threads))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command or "ccnf bench",
        "repeats": repeats,
        "device": {"setting": device_setting or params.device, **device_info(device)},
        "threads": {"extraction": extract_threads, "flow": flow_threads},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    sections: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ccnf-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sub_features: Path | None = None
        sub = params
        torch.set_num_threads(extract_threads)
        with _section("extraction", errors, console):
            sections["extraction"], sub_features, sub = bench_extraction(
                params, manifest, tmp, repeats, device
            )
        backbone_ms = None
        if "extraction" in sections:
            backbone_ms = 1000.0 / sections["extraction"]["forward_images_per_s"]["median"]
        torch.set_num_threads(flow_threads)
        if sub_features is not None:
            with _section("training", errors, console):
                # a full task is the slowest figure here: one run when the end-to-end runs
                # time every task's train stage again (twice), up to two runs otherwise
                sections["training"] = bench_training(
                    params,
                    sub,
                    sub_features,
                    full_features,
                    tmp,
                    repeats,
                    device,
                    task_repeats=1 if e2e else min(repeats, 2),
                )
            with _section("inference", errors, console):
                assert backbone_ms is not None
                sections["inference"] = bench_inference(
                    params, sub_features, backbone_ms, repeats, device
                )
            with _section("class selection", errors, console):
                sections["class_selection"] = bench_class_selection(
                    params, sub_features, repeats, device, class_counts
                )
        torch.set_num_threads(extract_threads)
        if e2e:
            with _section("end to end (dvc repro, dvc exp run)", errors, console):
                sections["e2e"] = bench_e2e(repo, tmp, console, committed_only=committed_only)
    memory: dict[str, Any] = {
        "bench_process_max_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
    }
    if "e2e" in sections:
        memory |= stage_memory(sections["e2e"])
        memory["feature_cache"] = sections["e2e"]["feature_cache"]
    else:
        memory["stages"] = None
        memory["stages_note"] = "measured only with the end-to-end runs (no --no-e2e)"
        if full_features is not None:
            memory["feature_cache"] = dir_size(full_features)
    sections["memory"] = memory
    if "training" in sections and (repo / "catalog.yaml").is_file():
        with _section("catalog (optimizer steps x ms per step)", errors, console):
            sections["catalog"] = catalog_cost(repo / "catalog.yaml", params_path,
                                               manifest_path, sections["training"])
    result |= sections

    ext, inf = sections.get("extraction"), sections.get("inference")
    e2e_sec = sections.get("e2e")
    passes = (inf or {}).get("passes")
    selection_passes = sections.get("class_selection", {}).get("passes_per_level_per_class")
    whole = (inf or {}).get("score_images_ms")
    result["targets"] = {
        "extraction_vs_forward": target("extraction_vs_forward", ext["ratio"] if ext else None),
        "flow_scoring_vs_backbone": target(
            "flow_scoring_vs_backbone",
            whole["median"] / inf["backbone_ms"] if inf and whole else None,
        ),
        "experiment_vs_repro": target("experiment_vs_repro", e2e_sec["ratio"] if e2e_sec else None),
        "flow_passes_per_class": target(
            "flow_passes_per_class",
            max(passes["passes_per_level_per_class"], selection_passes or 0)
            if passes and passes["every_patch_in_one_pass"]
            else None,
        ),
        "catalog_training_minutes": target(
            "catalog_training_minutes",
            sections["catalog"]["minutes"] if "catalog" in sections else None,
        ),
    }
    result["errors"] = errors
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, result)
    return result
