"""Continual-learning summaries of a task-by-task accuracy matrix.

``R`` is a (T, T) float array: ``R[t, j]`` is the metric (e.g. image AUROC) on task j measured
after training on tasks 0..t. Entries with j > t (tasks not seen yet) are ignored and are
usually NaN; the lower triangle including the diagonal must be finite. Higher = better.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "backward_transfer",
    "diagonal_average",
    "final_average",
    "forgetting",
    "per_task_forgetting",
    "step_average",
]


def _validate(R: ArrayLike) -> NDArray[np.float64]:
    r = np.asarray(R, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square (T, T) matrix, got shape {r.shape}")
    lower = np.tril_indices(r.shape[0])
    if not np.isfinite(r[lower]).all():
        bad = [(int(t), int(j)) for t, j in zip(*lower, strict=True) if not np.isfinite(r[t, j])]
        raise ValueError(
            f"R[t, j] must be finite for j <= t (tasks already trained); non-finite at {bad[:5]}"
        )
    return r


def final_average(R: ArrayLike) -> float:
    """Average metric over all tasks after training the last one: ``mean_j R[T-1, j]``."""
    r = _validate(R)
    return float(r[-1].mean())


def diagonal_average(R: ArrayLike) -> float:
    """Average metric of each task right after it was learned: ``mean_j R[j, j]`` (how well
    the model learns a task, before any later task can make it forget)."""
    r = _validate(R)
    return float(np.diag(r).mean())


def per_task_forgetting(R: ArrayLike) -> NDArray[np.float64]:
    """Forgetting of each task except the last, shape (T-1,).

    ``f_j = max_{t in [j, T-2]} R[t, j] - R[T-1, j]`` for j = 0..T-2: the drop from the best
    value the task ever had before the final step to its final value. Negative when the
    final value is the best (backward transfer). Empty for T == 1.
    """
    r = _validate(R)
    T = r.shape[0]
    # Rows j..T-2 of column j are all in the validated lower triangle, so max() sees no NaN.
    best = np.array([r[j : T - 1, j].max() for j in range(T - 1)], dtype=np.float64)
    return best - r[T - 1, : T - 1]


def forgetting(R: ArrayLike) -> float:
    """Mean forgetting over tasks 0..T-2 (see :func:`per_task_forgetting`).

    Returns 0.0 when T == 1: with a single task nothing can be forgotten.
    """
    f = per_task_forgetting(R)
    return float(f.mean()) if f.size else 0.0


def step_average(R: ArrayLike) -> float:
    """Mean over steps of the average over the tasks seen so far:
    ``(1/T) sum_t (1/(t+1)) sum_{j<=t} R[t, j]``. This is the "A-AUROC" that the IUF and CDAD
    tables print (averaged over the whole sequence, so early, easy steps weigh in); the
    after-last-task figure is :func:`final_average`."""
    r = _validate(R)
    return float(np.mean([r[t, : t + 1].mean() for t in range(r.shape[0])]))


def backward_transfer(R: ArrayLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017): ``(1/(T-1)) sum_{j<T-1} (R[T-1, j] -
    R[j, j])``, the mean change of each earlier task from right after it was learned to the
    end; negative = forgetting. 0.0 when T == 1."""
    r = _validate(R)
    T = r.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(r[T - 1, : T - 1] - np.diag(r)[: T - 1]))
