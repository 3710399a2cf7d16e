"""Report figures: per-task metric curves, task matrices, training losses, ROC curves, galleries.

Every public function renders one figure and writes it as a single PNG, atomically (a temporary
sibling file renamed onto ``out`` via :func:`ccnf.atomic.atomic_path`), then returns ``out``.
Figures are built with the object-oriented API on an Agg canvas, never through ``pyplot``: no
global figure registry, no GUI backend, nothing left open after saving, safe under any
``MPLBACKEND``.

Matrix conventions follow :mod:`ccnf.metrics.continual`: ``R[t, j]`` is the metric on task j
after training task t, NaN for j > t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from numpy.typing import NDArray

from ccnf.atomic import atomic_path

__all__ = [
    "GalleryRow",
    "plot_gallery",
    "plot_loss_curves",
    "plot_matrices",
    "plot_matrix",
    "plot_roc_curves",
    "plot_task_curves",
]

DPI = 110
# Beyond this many points a curve is thinned before drawing: pixel-level ROC curves have
# millions of points, far more than the ~500 pixels they are drawn on.
_MAX_CURVE_POINTS = 4000


# --------------------------------------------------------------------------------------------
# helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path | str) -> Path:
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            # The temporary name ends in .tmp, so the format must be explicit.
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        fig.clear()
    return out


def _grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    ncols = min(n, max_cols)
    return math.ceil(n / ncols), ncols


def _task_colors(n: int) -> list[tuple[float, float, float, float]]:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def _check_matrix(R: np.ndarray, task_names: Sequence[str], name: str) -> NDArray[np.float64]:
    r = np.asarray(R, dtype=np.float64)
    T = len(task_names)
    if r.shape != (T, T):
        raise ValueError(f"{name}: expected a ({T}, {T}) matrix for {T} task names, got {r.shape}")
    return r


def _matrix_cmap() -> Colormap:
    # NaN (not-yet-trained) cells are masked and drawn blank.
    return colormaps["viridis"].with_extremes(bad="white")


def _finite_range(mats: Sequence[np.ndarray]) -> tuple[float, float]:
    vals = np.concatenate([m[np.isfinite(m)] for m in mats])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    if lo == hi:
        # A flat colour scale would make Normalize map everything to 0; widen it symmetrically.
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _draw_matrix(
    ax: Axes, r: NDArray[np.float64], task_names: Sequence[str], vmin: float, vmax: float
) -> AxesImage:
    T = len(task_names)
    im = ax.imshow(np.ma.masked_invalid(r), cmap=_matrix_cmap(), vmin=vmin, vmax=vmax)
    fontsize = max(6.5, min(10.0, 110.0 / T))
    for t, j in zip(*np.nonzero(np.isfinite(r)), strict=True):
        v = r[t, j]
        # viridis is dark at the low end: white text there, black on the bright end.
        color = "white" if im.norm(v) < 0.6 else "black"
        ax.text(j, t, f"{v:.3f}", ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(range(T), task_names, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(T), task_names, fontsize="small")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    return im


def _thin_curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ~_MAX_CURVE_POINTS points of a monotone curve, evenly along x + y."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size <= _MAX_CURVE_POINTS:
        return x, y
    # x + y is non-decreasing along an ROC curve, so equal steps in it cover flat and steep
    # parts alike.
    s = x + y
    targets = np.linspace(s[0], s[-1], _MAX_CURVE_POINTS)
    idx = np.clip(np.searchsorted(s, targets), 0, s.size - 1)
    idx = np.unique(np.concatenate(([0], idx, [s.size - 1])))
    return x[idx], y[idx]


def _spans_orders_of_magnitude(v: np.ndarray, ratio: float = 100.0) -> bool:
    a = np.abs(v[np.isfinite(v)])
    a = a[a > 0]
    return a.size >= 2 and float(a.max()) / float(a.min()) > ratio


def _symlog_linthresh(v: np.ndarray) -> float:
    a = np.abs(v[np.isfinite(v)])
    a = a[a > 0]
    # Below the 5th percentile of |v| the axis is linear, so a few near-zero values do not
    # stretch the axis over many empty decades.
    return float(np.percentile(a, 5))


def _to_rgb(image: np.ndarray) -> NDArray[np.float64]:
    """(H, W, 3) float in [0, 1] from uint8 or float, (H, W), (H, W, 1) or (C, H, W)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    scale = 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float64) / scale
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), (H, W) or (3, H, W), got {np.shape(image)}")
    return np.clip(img, 0.0, 1.0)


def _normalise(m: np.ndarray) -> NDArray[np.float64]:
    """Min-max scale to [0, 1] (NaN-ignoring); a constant map becomes all zeros."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = np.nanmin(m), np.nanmax(m)
    if not np.isfinite(hi - lo) or hi == lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


# --------------------------------------------------------------------------------------------
# public plots


def plot_task_curves(
    R_by_name: Mapping[str, np.ndarray], task_names: Sequence[str], out: Path, title: str
) -> Path:
    """Per-task metric over the training sequence: one subplot per matrix, one line per task.

    Args:
        R_by_name: metric name (e.g. "nf image AUROC") -> (T, T) matrix ``R[t, j]``.
        task_names: the T task names, in training order.
        out: PNG path to write.
        title: figure title.

    Line j shows ``R[t, j]`` for t = j..T-1 against "after training task" t.
    """
    if not R_by_name:
        raise ValueError("plot_task_curves needs at least one matrix")
    mats = {name: _check_matrix(R, task_names, name) for name, R in R_by_name.items()}
    T = len(task_names)
    nrows, ncols = _grid_shape(len(mats))
    fig = _new_figure(max(4.5, 0.35 * T + 2.5) * ncols + 1.8, (3.2 + 0.08 * T) * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _task_colors(T)
    for ax, (name, r) in zip(axes, mats.items(), strict=False):
        for j in range(T):
            ax.plot(
                np.arange(j, T),
                r[j:, j],
                marker="o",
                markersize=3,
                lw=1.4,
                color=colors[j],
                label=task_names[j],
            )
        ax.set_title(name)
        ax.set_xlabel("after training task")
        ax.set_ylabel(name)
        ax.set_xticks(range(T), task_names, rotation=45, ha="right", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(mats) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title="task", fontsize="small")
    fig.suptitle(title)
    return _save(fig, out)


def plot_matrix(R: np.ndarray, task_names: Sequence[str], out: Path, title: str) -> Path:
    """Heatmap of a (T, T) task matrix; NaN cells blank, values annotated to 3 decimals.

    Rows are "after training task" t, columns "evaluated task" j.
    """
    r = _check_matrix(R, task_names, "R")
    side = max(4.5, 0.55 * len(task_names) + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.subplots()
    im = _draw_matrix(ax, r, task_names, *_finite_range([r]))
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.set_title(title)
    return _save(fig, out)


def plot_matrices(
    R_by_name: Mapping[str, np.ndarray], task_names: Sequence[str], out: Path, title: str
) -> Path:
    """Several task-matrix heatmaps side by side (e.g. one per score definition).

    All panels share one colour scale and colorbar so equal colours mean equal values.
    """
    if not R_by_name:
        raise ValueError("plot_matrices needs at least one matrix")
    mats = {name: _check_matrix(R, task_names, name) for name, R in R_by_name.items()}
    side = max(4.0, 0.55 * len(task_names) + 2.0)
    fig = _new_figure(side * len(mats) + 1.2, side + 0.6)
    axes = fig.subplots(1, len(mats), squeeze=False).ravel()
    vmin, vmax = _finite_range(list(mats.values()))
    im = None
    for ax, (name, r) in zip(axes, mats.items(), strict=True):
        im = _draw_matrix(ax, r, task_names, vmin, vmax)
        ax.set_title(name)
    fig.colorbar(im, ax=list(axes), shrink=0.85)
    fig.suptitle(title)
    return _save(fig, out)


def plot_loss_curves(rows: Sequence[Mapping[str, float]], out: Path, title: str) -> Path:
    """Training-loss terms against the global step, one subplot per term.

    Args:
        rows: per-step logs, each with ``step`` (global step), ``task`` (int) and one key per
            loss term (``loss``, ``L_g``, ...); an ``epoch`` column is ignored. A term missing
            from a row is a gap.
        out: PNG path to write.
        title: figure title.

    Dashed vertical lines mark the first step of each new task. A term whose nonzero
    magnitudes span more than two decades is drawn on a symlog y axis.
    """
    if not rows:
        raise ValueError("plot_loss_curves needs at least one row")
    rows = sorted(rows, key=lambda row: float(row["step"]))
    skip = ("step", "task", "epoch")
    terms = list(dict.fromkeys(k for row in rows for k in row if k not in skip))
    if not terms:
        raise ValueError("plot_loss_curves: rows hold no loss terms besides 'step' and 'task'")
    steps = np.array([float(row["step"]) for row in rows])
    tasks = np.array([row.get("task", 0) for row in rows])
    boundaries = steps[1:][tasks[1:] != tasks[:-1]]

    nrows, ncols = _grid_shape(len(terms))
    fig = _new_figure(4.2 * ncols, 2.9 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, term in zip(axes, terms, strict=False):
        v = np.array([float(row.get(term, np.nan)) for row in rows])
        ok = np.isfinite(v)
        ax.plot(steps[ok], v[ok], lw=1.0, color="tab:blue")
        for b in boundaries:
            ax.axvline(b, ls="--", lw=0.8, color="0.45")
        if _spans_orders_of_magnitude(v):
            ax.set_yscale("symlog", linthresh=_symlog_linthresh(v))
            finite = v[np.isfinite(v)]
            if finite.size and float(finite.min()) >= 0:
                ax.set_ylim(bottom=0)  # no empty negative decades for a non-negative term
        ax.set_title(term)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    for ax in axes[len(terms) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, out)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], out: Path, title: str
) -> Path:
    """ROC curves on one axis, with the chance diagonal.

    Args:
        curves: label -> ``(fpr, tpr, auroc)``, e.g. from :func:`ccnf.metrics.roc_curve`.
            Curves with millions of points are thinned for drawing (not for the AUROC shown).
        out: PNG path to write.
        title: figure title.
    """
    if not curves:
        raise ValueError("plot_roc_curves needs at least one curve")
    fig = _new_figure(5.6, 5.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", lw=1.0, color="0.5", label="chance")
    for label, (fpr, tpr, auc) in curves.items():
        x, y = _thin_curve(fpr, tpr)
        ax.plot(x, y, lw=1.5, label=f"{label} (AUROC {auc:.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title)
    return _save(fig, out)


@dataclass(frozen=True, eq=False)
class GalleryRow:
    """One gallery sample.

    Attributes:
        image: (H, W, 3) float in [0, 1] or uint8 (also (H, W) or (3, H, W)).
        mask: (h, w) bool ground truth; may be at a different resolution than the image.
        anomaly_map: (h', w') float anomaly scores; stretched over the image when drawn.
        caption: row title (e.g. "bottle / broken_large / 003  score 2.31").
    """

    image: np.ndarray
    mask: np.ndarray
    anomaly_map: np.ndarray
    caption: str


def plot_gallery(rows: Sequence[GalleryRow], out: Path, title: str) -> Path:
    """Qualitative samples: per row the image, the ground-truth contour, and the anomaly map.

    The anomaly map is min-max normalised per row, drawn with the jet colormap at alpha 0.5
    over the image, so colours compare pixels within a row, not across rows.
    """
    if not rows:
        raise ValueError("plot_gallery needs at least one row")
    fig = _new_figure(3 * 2.8, 3.0 * len(rows) + 0.5)
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for i, (sub, row) in enumerate(zip(subfigs, rows, strict=True)):
        img = _to_rgb(row.image)
        H, W = img.shape[:2]
        # Stretch mask and map over the image's pixel grid whatever their own resolution.
        extent = (-0.5, W - 0.5, H - 0.5, -0.5)
        mask = np.asarray(row.mask).astype(bool)
        if mask.ndim == 3:
            mask = mask.reshape(mask.shape[-2:])
        amap = np.asarray(row.anomaly_map, dtype=np.float64)
        if amap.ndim == 3:
            amap = amap.reshape(amap.shape[-2:])

        ax_img, ax_gt, ax_map = sub.subplots(1, 3)
        ax_img.imshow(img)
        ax_gt.imshow(img)
        if mask.any():
            mh, mw = mask.shape
            xs = (np.arange(mw) + 0.5) * (W / mw) - 0.5
            ys = (np.arange(mh) + 0.5) * (H / mh) - 0.5
            ax_gt.contour(xs, ys, mask.astype(float), levels=[0.5], colors="red", linewidths=1.2)
        ax_map.imshow(img)
        ax_map.imshow(
            _normalise(amap),
            cmap="jet",
            alpha=0.5,
            vmin=0.0,
            vmax=1.0,
            extent=extent,
            interpolation="bilinear",
        )
        if i == 0:
            ax_img.set_title("image", fontsize="small")
            ax_gt.set_title("ground truth", fontsize="small")
            ax_map.set_title("anomaly map (row-normalised)", fontsize="small")
        for ax in (ax_img, ax_gt, ax_map):
            ax.set_axis_off()
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        sub.suptitle(row.caption, fontsize="medium")
    fig.suptitle(title, fontsize="large")
    return _save(fig, out)
