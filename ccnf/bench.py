"""``ccnf bench``: where the study's time and memory go, measured side by side in one run.

Not part of the default study (no DVC stage). Every figure is the median of ``repeats``
runs in one process, after one warm-up run where a warm-up means anything; the single runs
are kept in ``bench.json`` so the spread (this machine is shared) is visible.

Sections (keys of ``bench.json``):

* ``extraction``: images/s through the extract stage's code path
  (:func:`ccnf.features.extract_features` on every image of one class: decode, resize, forward,
  cache) vs the bare backbone forward on a batch of ``backbone.batch_size`` decoded images;
* ``training``: flow training throughput (forward + backward + AdamW step of ``L_g`` on one
  step's patch vectors) in feature vectors/s and vectors/s through one coupling block; and
  the wall time of a full task (:func:`ccnf.train.train_task` on task ``t0``);
* ``inference``: per image, ms: backbone, flow (every level, every patch), scoring (the
  per-patch arithmetic after the flow), map post-processing (upsample, level mean, blur, pool)
  and :func:`ccnf.scoring.score_images` as a whole (the evaluation's code path);
  ``passes`` checks that a batch costs one flow pass per level (per class);
* ``class_selection``: ms per image to choose the class of a test image among K seen classes
  (K = 3, 15, 60), ``likelihood`` (argmax_y log p(x|y)) and ``prototype`` (nearest P e_y
  after the pass); both need one flow pass per class;
* ``memory``: peak resident memory and wall time of every DVC stage (from the end-to-end
  runs: each stage's ``python`` runs through a shim that reads ``RUSAGE_CHILDREN``) and the
  size of the feature cache on disk;
* ``e2e``: ``dvc repro`` from nothing vs a params-only ``dvc exp run -S
  loss.lambda_center=0.1`` from the state it left, in a throw-away snapshot of the repository
  with its own DVC cache (``--no-e2e`` skips it and the stage memory);
* ``targets``: each ratio, its target and whether it is met.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from ccnf.atomic import write_json
from ccnf.config import Params, load_params, parse_params
from ccnf.data.manifest import Manifest
from ccnf.device import device_info, resolve_device
from ccnf.errors import CcnfError
from ccnf.optim import AdamW

SCHEMA = 1
CLASS_COUNTS = (3, 15, 60)
SELECTION_BATCH = 2
EXPERIMENT = "loss.lambda_center=0.1"
TARGETS: dict[str, tuple[str, float, str]] = {
    "extraction_vs_forward": (">=", 0.8, "extract stage images/s / bare backbone forward images/s"),
    "flow_scoring_vs_backbone": (
        "<=",
        0.5,
        "score_images ms per image (flow + scoring + maps) / backbone ms per image",
    ),
    "experiment_vs_repro": ("<=", 0.4, f"dvc exp run -S {EXPERIMENT} seconds / dvc repro seconds"),
    "flow_passes_per_class": (
        "<=",
        1.0,
        "flow passes per level, per class and per batch (score_images, select_classes)",
    ),
}


# -- measuring --------------------------------------------------------------------------------
def measure(
    fn: Callable[[], Any],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def figure(values: list[float], unit: str, digits: int = 3) -> dict[str, Any]:
    """{median, min, max, runs, unit} of single-run values (the median is the figure)."""
    if not values:
        raise ValueError("a figure needs at least one run")
    return {
        "median": round(float(statistics.median(values)), digits),
        "min": round(float(min(values)), digits),
        "max": round(float(max(values)), digits),
        "runs": [round(float(v), digits) for v in values],
        "unit": unit,
    }


def rate(seconds: list[float], count: float, unit: str) -> dict[str, Any]:
    """Throughput figure (count / s per run)."""
    return figure([count / max(s, 1e-12) for s in seconds], unit, 2)


def per_item_ms(seconds: list[float], count: float) -> dict[str, Any]:
    """Latency figure: ms per item per run."""
    return figure([1000.0 * s / count for s in seconds], "ms", 3)


def target(name: str, value: float | None) -> dict[str, Any]:
    """A ratio against its target from :data:`TARGETS`; ``met`` is None when not measured."""
    op, bound, what = TARGETS[name]
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {
        "value": None if value is None else round(float(value), 4),
        "target": f"{op} {bound}",
        "met": met,
        "what": what,
    }


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def dir_size(path: Path) -> dict[str, float]:
    """Apparent and on-disk size of a directory tree, MB (10^6 bytes)."""
    apparent = blocks = 0
    files = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            apparent += st.st_size
            blocks += st.st_blocks * 512
            files += 1
    return {"mb": round(apparent / 1e6, 1), "disk_mb": round(blocks / 1e6, 1), "files": files}


# -- sections -----------------------------------------------------------------------------------
def _subset_params(params: Params, classes: list[str]) -> Params:
    """params with a one-task split of ``classes`` (for runs on part of the data)."""
    raw = params.model_dump()
    raw["data"] |= {"classes": list(classes), "protocol": "all-in-one"}
    raw["tasks"] = {"t0": {"prev": "models/init"}}
    return parse_params(raw, "bench subset")


def bench_extraction(
    params: Params, manifest: Manifest, out_dir: Path, repeats: int, device: torch.device
) -> tuple[dict[str, Any], Path, Params]:
    """Stage code path on every image of the first class vs the bare forward."""
    from ccnf.backbone import Backbone
    from ccnf.data.images import load_image
    from ccnf.features import extract_features

    cls = params.classes[0]
    sub = _subset_params(params, [cls])
    records = [r for r in manifest.records if r.cls == cls]
    sub_manifest = Manifest(manifest.root, records)
    stage_rates, inner_rates, build_s = [], [], []
    features = out_dir / "features"
    for i in range(repeats):
        stats = extract_features(
            sub_manifest, sub, out_dir / f"features_{i}", console=_QUIET, device=device
        )
        stage_rates.append(stats["stage_images_per_s"])
        inner_rates.append(stats["forward_images_per_s"])
        build_s.append(stats.get("build_seconds", float("nan")))
        if i == 0:
            os.replace(out_dir / "features_0", features)
        else:
            shutil.rmtree(out_dir / f"features_{i}")

    bs = params.backbone.batch_size
    size = params.data.image_size
    root = Path(manifest.root)
    imgs = [load_image(root / r.image, size) for r in records[:bs]]
    while len(imgs) < bs:  # fewer images than a batch: repeat them
        imgs += imgs[: bs - len(imgs)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(device)
    torch.manual_seed(params.seed)
    backbone = Backbone(params.backbone).to(device)
    fwd = measure(lambda: backbone(x), repeats, sync=_synchronizer(device))
    section = {
        "class": cls,
        "images": len(records),
        "batch_size": bs,
        "image_size": size,
        "stage_images_per_s": figure(stage_rates, "images/s", 2),
        "stage_forward_images_per_s": figure(inner_rates, "images/s", 2),
        "forward_images_per_s": rate(fwd, bs, "images/s"),
        "backbone_build_s": figure(build_s, "s", 2),
    }
    section["ratio"] = round(
        section["stage_images_per_s"]["median"] / section["forward_images_per_s"]["median"], 4
    )
    return section, features, sub


def _model(meta: Any, params: Params, n_classes: int, device: torch.device) -> Any:
    """A freshly initialised CCNF with n_classes rows, past its warm-up (fully affine)."""
    from ccnf.flows.ccnf import CCNF

    torch.manual_seed(params.seed)
    model = CCNF(meta.channels, meta.grids, params.flow, n_classes=n_classes).to(device)
    model.global_step.fill_(params.flow.warmup_steps)
    return model


def _patch_batch(feat: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D, H, W) cached features -> x (B*H*W, D) float32, pos (B*H*W,)."""
    b, d, h, w = feat.shape
    x = feat.float().flatten(2).transpose(1, 2).reshape(b * h * w, d).to(device)
    pos = torch.arange(h * w, device=device).repeat(b)
    return x, pos


def bench_training(
    params: Params,
    sub: Params,
    features: Path,
    full_features: Path | None,
    out_dir: Path,
    repeats: int,
    device: torch.device,
    task_repeats: int = 1,
) -> dict[str, Any]:
    """L_g training-step throughput, and a full task's wall time (``task_repeats`` runs)."""
    from ccnf.features import FeatureMeta, load_split
    from ccnf.train import init_model, train_task

    meta = FeatureMeta.load(features)
    split = load_split(features, meta.classes[0], "train")
    tc = params.train
    model = _model(meta, params, 3, device)
    model.train()
    opt = AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(params.seed)
    k = tc.patches_per_image
    batches = []
    for feat in split.features:
        n, d, h, w = feat.shape
        imgs = torch.randint(n, (tc.images_per_step,), generator=gen)
        flat = feat[imgs].float().flatten(2).transpose(1, 2)  # (B, HW, D)
        kk = h * w if k is None else min(k, h * w)
        pos = torch.rand(len(imgs), h * w, generator=gen).argsort(dim=1)[:, :kk]
        x = flat[torch.arange(len(imgs))[:, None], pos].reshape(-1, d).to(device)
        batches.append((x, pos.reshape(-1).to(device)))
    y = [torch.zeros(len(x), dtype=torch.long, device=device) for x, _ in batches]

    def step() -> None:
        loss = sum(
            -model.forward_level(lvl, x, y[lvl], pos).log_prob.mean() / x.shape[1]
            for lvl, (x, pos) in enumerate(batches)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = 5
    secs = measure(lambda: [step() for _ in range(steps)], repeats, sync=_synchronizer(device))
    secs = [s / steps for s in secs]
    vectors = sum(len(x) for x, _ in batches)
    section: dict[str, Any] = {
        "vectors_per_step": vectors,
        "n_couplings": params.flow.n_couplings,
        "hidden_dim": params.flow.hidden_dim,
        "step_ms": figure([1000 * s for s in secs], "ms", 2),
        "vectors_per_s": rate(secs, vectors, "vectors/s"),
        "vectors_per_s_per_coupling": rate(
            secs, vectors * params.flow.n_couplings, "vectors/s through one coupling block"
        ),
    }

    # a full task, exactly as the train stage runs it
    use_full = full_features is not None and (full_features / "meta.json").is_file()
    task_params = params if use_full else sub
    task_features = full_features if use_full else features
    assert task_features is not None
    task = task_params.task_names[0]
    init_dir = out_dir / "models_init"
    init_model(task_params, task_features, init_dir)
    task_s, steps_done = [], 0.0
    for i in range(task_repeats):
        t0 = time.perf_counter()
        stats = train_task(task_params, task, task_features, init_dir, out_dir / f"task_{i}")
        task_s.append(time.perf_counter() - t0)
        steps_done = stats.get("steps", float("nan"))
        shutil.rmtree(out_dir / f"task_{i}", ignore_errors=True)
    section["task"] = {
        "task": task,
        "classes": task_params.split[0],
        "features": "full cache" if use_full else "bench subset (first class only)",
        "steps": steps_done,
        "seconds": figure(task_s, "s", 2),
    }
    return section


def _count_passes(model: Any) -> tuple[list[tuple[int, int]], Callable[[], None]]:
    """Record (level, rows) of every forward_level call; returns the log and an undo."""
    calls: list[tuple[int, int]] = []
    original = model.forward_level

    def counted(level: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((level, x.shape[0]))
        return original(level, x, *args, **kwargs)

    model.forward_level = counted

    def undo() -> None:
        del model.forward_level

    return calls, undo


def bench_inference(
    params: Params,
    features: Path,
    backbone_ms: float,
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-image cost of scoring a test batch, split into its parts."""
    from ccnf.features import FeatureMeta, load_split
    from ccnf.scoring import gaussian_blur, pool, score_images, unit_level_stats

    meta = FeatureMeta.load(features)
    split = load_split(features, meta.classes[0], "test")
    b = min(params.eval.batch_images, len(split))
    feats = [f[:b].to(device) for f in split.features]
    n_classes = len(params.classes)
    model = _model(meta, params, n_classes, device)
    model.eval()
    cid = n_classes - 1
    y_img = torch.full((b,), cid, dtype=torch.long, device=device)
    size, sigma = params.data.mask_size, params.score.smoothing_sigma
    batch = [_patch_batch(f, device) for f in feats]
    ys = [y_img.repeat_interleave(len(x) // b) for x, _ in batch]
    sync = _synchronizer(device)

    outs: list[Any] = []

    @torch.no_grad()
    def flow() -> None:
        outs[:] = [model.forward_level(lvl, x, ys[lvl], pos) for lvl, (x, pos) in enumerate(batch)]

    flow()
    maps: list[list[torch.Tensor]] = [[], []]

    @torch.no_grad()
    def scoring() -> None:
        nf, pr, img = [], [], []
        for lvl, out in enumerate(outs):
            _, d, h, w = feats[lvl].shape
            mu = model.prototype(lvl, y_img)
            z = out.z.view(b, h * w, d)
            nf.append((-out.log_prob / d).view(b, 1, h, w))
            pr.append(((z - mu[:, None]).pow(2).sum(-1) / d).view(b, 1, h, w))
            img.append((z.mean(dim=1) - mu).pow(2).sum(-1) / d)
        torch.stack(img).mean(dim=0).cpu()
        maps[:] = [nf, pr]

    scoring()

    @torch.no_grad()
    def post() -> None:
        for levels in maps:
            up = [
                F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                for m in levels
            ]
            amap = gaussian_blur(torch.cat(up, dim=1).mean(dim=1), sigma).cpu().numpy()
        pool(amap, params.score)

    unit = unit_level_stats(b, len(feats))  # same arithmetic as real calibration statistics

    def whole() -> None:
        score_images(model, feats, y_img, params.score, params.data.mask_size, b, unit)

    section: dict[str, Any] = {
        "batch_images": b,
        "patches_per_image": sum(len(x) for x, _ in batch) // b,
        "backbone_ms": round(backbone_ms, 3),
        "flow_ms": per_item_ms(measure(flow, repeats, sync=sync), b),
        "scoring_ms": per_item_ms(measure(scoring, repeats, sync=sync), b),
        "postprocess_ms": per_item_ms(measure(post, repeats, sync=sync), b),
    }
    try:
        section["score_images_ms"] = per_item_ms(measure(whole, repeats, sync=sync), b)
        calls, undo = _count_passes(model)
        try:
            whole()
        finally:
            undo()
        rows = {lvl: [r for lv, r in calls if lv == lvl] for lvl in range(model.n_levels)}
        want = [b * h * w for h, w in meta.grids]
        per_level = max(len(r) for r in rows.values())
        section["passes"] = {
            "flow_calls_per_batch": len(calls),
            "levels": model.n_levels,
            "passes_per_level_per_class": per_level,
            "every_patch_in_one_pass": all(
                rows[lvl] == [want[lvl]] for lvl in range(model.n_levels)
            ),
        }
    except RuntimeError as err:  # e.g. score_images not yet device-aware on a GPU
        section["score_images_ms"] = None
        section["error"] = f"score_images on {device.type}: {err}"
    return section


def _library_selection() -> Callable[..., Any] | None:
    """``select_classes(model, features, candidates, method, batch_images)`` once the library
    has one (ccnf.scoring or ccnf.selection), else None."""
    import importlib

    for module in ("ccnf.scoring", "ccnf.selection"):
        try:
            fn = getattr(importlib.import_module(module), "select_classes", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


def bench_class_selection(
    params: Params,
    features: Path,
    repeats: int,
    device: torch.device,
    counts: tuple[int, ...] = CLASS_COUNTS,
) -> dict[str, Any]:
    """ms per image to select among K classes: one flow pass per class per batch.

    likelihood: argmax_k mean over patches and levels of log p(x | k) / D_l;
    prototype: argmin_k mean over levels of ||zbar_k - P e_k||^2 / D_l, with zbar_k the spatial
    mean of z = f(x; e_k) (so it needs the same K passes). Timed through the library's
    ``select_classes`` when it exists (and runs on the device), else through equivalent
    passes written here.
    """
    from ccnf.features import FeatureMeta, load_split

    meta = FeatureMeta.load(features)
    split = load_split(features, meta.classes[0], "test")
    # the cost per image is linear in the batch; a small batch keeps 60 classes affordable
    b = min(SELECTION_BATCH, params.eval.batch_images, len(split))
    feats = [f[:b].to(device) for f in split.features]
    batch = [_patch_batch(f, device) for f in feats]
    sync = _synchronizer(device)
    library = _library_selection()

    def ours(model: Any, k: int, method: str) -> Callable[[], Any]:
        @torch.no_grad()
        def run() -> torch.Tensor:
            stat = torch.zeros(k, b, device=device)
            for c in range(k):
                for lvl, (x, pos) in enumerate(batch):
                    y = torch.full((len(x),), c, dtype=torch.long, device=device)
                    out = model.forward_level(lvl, x, y, pos)
                    d = x.shape[1]
                    if method == "likelihood":
                        stat[c] += (out.log_prob / d).view(b, -1).mean(dim=1)
                    else:
                        mu = model.prototype(lvl, y[:1])
                        stat[c] -= (out.z.view(b, -1, d).mean(dim=1) - mu).pow(2).sum(-1) / d
            return stat.argmax(dim=0).cpu()

        return run

    kwargs: dict[str, Any] = {}
    if library is not None and "level" in inspect.signature(library).parameters:
        # the levels the evaluation selects on (score.select_level: -1 deepest, null all)
        kwargs["level"] = getattr(params.score, "select_level", -1)

    def selector(model: Any, k: int, method: str) -> Callable[[], Any]:
        if library is None:
            return ours(model, k, method)
        cand = torch.arange(k)
        return lambda: library(model, feats, cand, method, b, **kwargs)

    function = "ccnf.scoring.select_classes" if library is not None else "ccnf.bench passes"
    if library is not None:
        try:  # a CPU-only library function on a GPU: fall back to the equivalent passes
            selector(_model(meta, params, 2, device).eval(), 2, "likelihood")()
        except (RuntimeError, TypeError) as err:
            library = None
            function = f"ccnf.bench passes (select_classes failed: {err})"
    out: dict[str, Any] = {"batch_images": b, "function": function, **kwargs}

    for k in counts:
        model = _model(meta, params, k, device)
        model.eval()
        reps = repeats if k <= 15 else min(repeats, 2)
        out[str(k)] = {
            method + "_ms": per_item_ms(
                measure(selector(model, k, method), reps, warmup=0, sync=sync), b
            )
            for method in ("likelihood", "prototype")
        }
        if k == counts[0]:
            calls, undo = _count_passes(model)
            try:
                selector(model, k, "likelihood")()
            finally:
                undo()
            per_level = [sum(lv == lvl for lv, _ in calls) for lvl in range(model.n_levels)]
            out["levels_used"] = [lvl for lvl, n in enumerate(per_level) if n]
            # flow passes per class on each level used (1: every patch of a batch at once)
            out["passes_per_level_per_class"] = max(per_level) / k
    return out


# -- end to end -------------------------------------------------------------------------------
SHIM = """#!{python}
# ccnf bench: runs a DVC stage's python and logs its peak RSS (RUSAGE_CHILDREN) and wall time
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call([{python!r}, *sys.argv[1:]])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(os.environ["CCNF_BENCH_STAGE_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "seconds": time.perf_counter() - t0,
                         "max_rss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime,
                         "rc": rc}}) + "\\n")
sys.exit(rc)
"""


def _git(repo: Path, *args: str) -> str:
    res = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.name=ccnf bench",
            "-c",
            "user.email=bench@localhost",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise CcnfError(
            f"git {' '.join(args)} failed in {repo}: {res.stderr.strip()[-500:]}",
            fix="the end-to-end bench needs a git repository (or run with --no-e2e)",
        )
    return res.stdout


def snapshot_repo(repo: Path, dest: Path, *, committed_only: bool = False) -> Path:
    """A throw-away clone of ``repo`` holding its current working tree, committed.

    The clone has no DVC outputs and its own (empty) DVC cache. Unless ``committed_only``,
    the working tree's tracked and untracked-but-not-ignored files are copied over the
    checkout (deleted ones removed), so uncommitted changes are measured too.
    """
    repo = Path(repo).resolve()
    if not (repo / ".git").exists():
        raise CcnfError(f"not a git repository: {repo}", fix="run ccnf bench from the repo root")
    res = subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(repo), str(dest)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise CcnfError(f"git clone of {repo} failed: {res.stderr.strip()[-500:]}")
    if not committed_only:
        listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
        for rel in filter(None, listed.split("\0")):
            src, dst = repo / rel, dest / rel
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif not src.exists() and dst.exists():
                dst.unlink()
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "--allow-empty", "-m", "ccnf bench snapshot")
    return dest


def _stage_name(argv: list[str]) -> str | None:
    if not argv or not argv[0].startswith("stages/"):
        return None
    name = Path(argv[0]).stem
    if "--task" in argv:
        name += "@" + argv[argv.index("--task") + 1]
    return name


def _read_stage_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        name = _stage_name(row["argv"])
        if name is not None:
            rows.append(
                {
                    "stage": name,
                    "seconds": round(row["seconds"], 2),
                    "max_rss_mb": round(row["max_rss_kb"] / 1024, 1),
                    "cpu_s": round(row["cpu_s"], 2),
                    "rc": row["rc"],
                }
            )
    return rows


def _dvc() -> str:
    exe = Path(sys.executable).parent / "dvc"
    found = str(exe) if exe.is_file() else shutil.which("dvc")
    if not found:
        raise CcnfError("dvc not found", fix="pip install -e . (dvc is a dependency of ccnf)")
    return found


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise CcnfError(
            f"{' '.join(cmd[1:])} failed (exit {res.returncode}) in the bench snapshot {cwd}:\n    "
            + "\n    ".join(tail),
            fix="make `dvc repro` pass in the repository first (or run with --no-e2e)",
        )
    return secs


def bench_e2e(
    repo: Path, work: Path, console: Console, *, committed_only: bool = False
) -> dict[str, Any]:
    """Full ``dvc repro`` from nothing, then a params-only ``dvc exp run`` from its state."""
    snap = snapshot_repo(repo, work / "repo", committed_only=committed_only)
    shim_dir = work / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [str(shim_dir), str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("VIRTUAL_ENV", None)
    log = work / "dvc.log"
    dvc = _dvc()
    out: dict[str, Any] = {"snapshot": "committed HEAD" if committed_only else "working tree"}
    phases = [
        ("repro", [dvc, "repro"]),
        ("experiment", [dvc, "exp", "run", "-S", EXPERIMENT]),
    ]
    for phase, cmd in phases:
        stage_log = work / f"stages_{phase}.jsonl"
        env["CCNF_BENCH_STAGE_LOG"] = str(stage_log)
        console.print(f"[dim]bench e2e: {' '.join(['dvc', *cmd[1:]])} in {snap}[/]")
        secs = _run_logged(cmd, snap, env, log)
        stages = _read_stage_log(stage_log)
        out[phase] = {
            "command": " ".join(["dvc", *cmd[1:]]),
            "seconds": round(secs, 2),
            "stages": stages,
            "stages_run": [s["stage"] for s in stages],
        }
    out["ratio"] = round(out["experiment"]["seconds"] / out["repro"]["seconds"], 4)
    out["feature_cache"] = dir_size(snap / "features")
    out["dvc_cache"] = dir_size(snap / ".dvc" / "cache")
    return out


def stage_memory(e2e: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS per stage over both end-to-end runs (MB), and the largest of all."""
    per: dict[str, dict[str, float]] = {}
    for phase in ("repro", "experiment"):
        for row in e2e.get(phase, {}).get("stages", []):
            cur = per.setdefault(row["stage"], {"max_rss_mb": 0.0, "seconds": row["seconds"]})
            cur["max_rss_mb"] = max(cur["max_rss_mb"], row["max_rss_mb"])
            if phase == "repro":
                cur["seconds"] = row["seconds"]
    peak = max((v["max_rss_mb"] for v in per.values()), default=None)
    return {"stages": per, "peak_mb": peak}


# -- the whole bench -------------------------------------------------------------------------
_QUIET = Console(quiet=True)


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
    manifest = Manifest.load(manifest_path or repo / "data" / "manifest.json")
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
    }
    result["errors"] = errors
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, result)
    return result


# -- the table -------------------------------------------------------------------------------
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
