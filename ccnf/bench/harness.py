"""The timing harness of ``ccnf bench`` and the records it writes: timed repeats
(:func:`measure`), figures (median, min, max and the single runs), throughput and latency
figures, the targets each ratio is held to, directory sizes, and a flow-pass counter.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# the params-only experiment the end-to-end section times against a full ``dvc repro``
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
    "catalog_training_minutes": (
        "<=",
        60.0,
        "least minutes the whole catalog's optimizer steps take on 2 workers "
        "(ccnf catalog cost x the task's ms per step; evaluation not counted)",
    ),
}
#: runs side by side in the catalog's time target (``ccnf catalog run --jobs 2``)
CATALOG_WORKERS = 2


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


def synchronizer(device: torch.device) -> Callable[[], None] | None:
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


@contextlib.contextmanager
def count_passes(model: Any) -> Iterator[list[tuple[int, int]]]:
    """Record (level, rows) of every flow pass of ``model`` while the block runs.

    A forward pre-hook on each level's flow (``model.flows[level]``, called once per
    ``forward_level``) logs the level and the number of vectors of the pass; the model itself
    is not changed, and the hooks are removed when the block ends.
    """
    calls: list[tuple[int, int]] = []

    def hook(level: int) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            calls.append((level, args[0].shape[0]))

        return record

    handles = [flow.register_forward_pre_hook(hook(lvl)) for lvl, flow in enumerate(model.flows)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
