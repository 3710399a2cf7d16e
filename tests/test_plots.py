"""Every plot writes one readable, non-empty PNG and leaves no temporary files behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccnf.plots import (
    GalleryRow,
    plot_gallery,
    plot_loss_curves,
    plot_matrices,
    plot_matrix,
    plot_roc_curves,
    plot_task_curves,
)

TASKS = ["bottle", "cable", "capsule", "carpet"]


def _matrix(seed: int, T: int = len(TASKS)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    R = rng.uniform(0.5, 1.0, size=(T, T))
    R[np.triu_indices(T, 1)] = np.nan
    return R


def _assert_single_png(out: Path, returned: Path) -> None:
    assert Path(returned) == out
    assert out.stat().st_size > 1000
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_plot_task_curves(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    R = {"nf image AUROC": _matrix(0), "nf pixel AUROC": _matrix(1), "knn image AUROC": _matrix(2)}
    _assert_single_png(out, plot_task_curves(R, TASKS, out, "per-task AUROC"))


def test_plot_matrix(tmp_path: Path) -> None:
    out = tmp_path / "matrix.png"
    _assert_single_png(out, plot_matrix(_matrix(3), TASKS, out, "image AUROC"))


def test_plot_matrix_single_task_and_constant_values(tmp_path: Path) -> None:
    out = tmp_path / "m1.png"
    _assert_single_png(out, plot_matrix(np.array([[0.9]]), ["bottle"], out, "one task"))


def test_plot_matrices(tmp_path: Path) -> None:
    out = tmp_path / "matrices.png"
    R = {"nll": _matrix(4), "nll + reg": _matrix(5)}
    _assert_single_png(out, plot_matrices(R, TASKS, out, "score definitions"))


def test_plot_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matrix"):
        plot_matrix(_matrix(0, T=3), TASKS, tmp_path / "bad.png", "bad")
    assert list(tmp_path.iterdir()) == []


def test_plot_loss_curves(tmp_path: Path) -> None:
    rows = []
    for step in range(300):
        task = step // 100
        rows.append(
            {
                "step": step,
                "task": task,
                "loss": 1e4 * np.exp(-step / 10) - 50.0,  # spans decades and goes negative
                "L_g": 1.0 + 0.1 * np.sin(step),
                "L_logdet_reg": 1e-3 * (step + 1),
                **({"L_replay": 0.5} if task > 0 else {}),  # term missing on task 0
            }
        )
    out = tmp_path / "loss.png"
    _assert_single_png(out, plot_loss_curves(rows, out, "training losses"))


def test_plot_roc_curves(tmp_path: Path) -> None:
    from ccnf.metrics import auroc, roc_curve

    rng = np.random.default_rng(0)
    curves = {}
    for name, n in [("image", 200), ("pixel", 50_000)]:
        y = rng.random(n) < 0.2
        s = rng.normal(size=n) + y
        fpr, tpr, _ = roc_curve(y, s)
        curves[name] = (fpr, tpr, auroc(y, s))
    out = tmp_path / "roc.png"
    _assert_single_png(out, plot_roc_curves(curves, out, "ROC"))


def test_plot_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        image = rng.random((64, 64, 3))
        if i % 2:
            image = (image * 255).astype(np.uint8)
        mask = np.zeros((64, 64), dtype=bool)
        if i < 2:
            mask[20:30, 10:40] = True
        amap = rng.random((16, 16)) if i == 1 else rng.random((64, 64))  # lower-res map
        rows.append(GalleryRow(image=image, mask=mask, anomaly_map=amap, caption=f"sample {i}"))
    rows.append(
        GalleryRow(
            image=rng.random((64, 64)),
            mask=np.zeros((64, 64), bool),
            anomaly_map=np.zeros((64, 64)),
            caption="grey image, constant map",
        )
    )
    out = tmp_path / "gallery.png"
    _assert_single_png(out, plot_gallery(rows, out, "qualitative"))


def test_overwrites_existing_file_and_creates_parent(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "matrix.png"
    plot_matrix(_matrix(0), TASKS, out, "first")
    first = out.read_bytes()
    plot_matrix(_matrix(1), TASKS, out, "second")
    assert out.read_bytes() != first
    _assert_single_png(out, out)
