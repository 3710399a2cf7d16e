"""Shared fixtures: tiny MVTec-layout datasets and params for fast end-to-end tests."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec_root(
    root: Path, classes: list[str], *, n_train: int = 6, n_good: int = 2, n_bad: int = 2,
    size: int = 48, seed: int = 0,
) -> Path:
    """A tiny MVTec-layout dataset: noisy colour fields, defects are bright squares."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        base = rng.integers(40, 200, size=3)

        def normal(base: np.ndarray = base) -> np.ndarray:
            noise = rng.normal(0, 12, size=(size, size, 3))
            return np.clip(base + noise, 0, 255).astype(np.uint8)

        for i in range(n_train):
            write_png(root / cls / "train" / "good" / f"{i:03d}.png", normal())
        for i in range(n_good):
            write_png(root / cls / "test" / "good" / f"{i:03d}.png", normal())
        for i in range(n_bad):
            img = normal()
            mask = np.zeros((size, size), dtype=np.uint8)
            y, x = rng.integers(4, size - 16, size=2)
            img[y : y + 12, x : x + 12] = 255 - (k * 20) % 255
            mask[y : y + 12, x : x + 12] = 255
            write_png(root / cls / "test" / "hole" / f"{i:03d}.png", img)
            write_png(root / cls / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask)
    return root


def default_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def raw_params() -> dict[str, Any]:
    """params.yaml of the repository as a plain dict (edit freely)."""
    return default_params()


def protocol_of(split: list[list[str]]) -> str:
    """The data.protocol that cuts the flattened split back into these tasks."""
    sizes = [len(t) for t in split]
    if len(set(sizes)) == 1:
        return f"{len(sizes)}x{sizes[0]}"
    return "-".join(str(s) for s in sizes)


def shrink(p: dict[str, Any]) -> dict[str, Any]:
    """Make params (a params.yaml dict) small and fast, in place: tiny images, a small flow, a
    few optimizer steps, one evaluation process. The tests exercise the code paths, not the
    competence budget (the default's per-class step floor alone is 200 steps per class)."""
    p["data"].update(image_size=64, mask_size=32)
    p["backbone"]["batch_size"] = 8
    p["flow"].update(n_couplings=2, hidden_dim=16, hidden_ratio=None, embedding_dim=8, pos_dim=8,
                     warmup_steps=4)
    p["train"].update(epochs=1, images_per_step=4, patches_per_image=16, min_steps_per_class=2,
                      lr_warmup_steps=0)
    p["loss"]["entropy_samples"] = 16
    # one process: the worker pool's start-up costs more than tiny evaluations (equal metrics
    # for any worker count: tests/test_evaluate.py)
    p["eval"].update(batch_images=4, workers=1)
    return p


def tiny_params(root: Path, classes: list[list[str]]) -> dict[str, Any]:
    """Params for a fast run on a tiny MVTec-layout root (source folder) with this task split."""
    p = shrink(default_params())
    p["data"].update(
        source="folder", root=str(root),
        classes=[c for task in classes for c in task], protocol=protocol_of(classes),
        generate=[],
    )
    p["tasks"] = {
        f"t{i}": {"prev": "models/init" if i == 0 else f"models/t{i - 1}"}
        for i in range(len(classes))
    }
    return p


def run_stages_here(work: Path) -> set[str]:
    """Run the stage scripts of the study in ``work`` from init to aggregate as DVC would (same
    argv, working directory and DAG order) but in this process, which spares an interpreter
    start-up (most of a tiny stage's time) per stage. Returns the stages run; the caller records
    them with ``dvc commit`` if DVC must see them as done."""
    from ccnf.config import load_params

    tasks = load_params(work / "params.yaml").task_names
    steps = [("init", [])]
    steps += [(f"train@{t}", ["--task", t]) for t in tasks]
    steps += [(f"evaluate@{t}", ["--task", t]) for t in tasks]
    steps += [("aggregate", [])]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.syspath_prepend(str(work / "stages"))
        for stage, args in steps:
            script = work / "stages" / f"{stage.split('@')[0]}.py"
            mp.setattr(sys, "argv", [str(script), *args])
            runpy.run_path(str(script), run_name="__main__")
    return {stage for stage, _ in steps}


def make_visa_root(
    root: Path, objects: list[str], *, n_train: int = 5, n_good: int = 2, n_bad: int = 2,
    size: int = 48, mask_value: int = 1, seed: int = 0,
) -> Path:
    """A tiny VisA-shaped dataset: JPEG images, split_csv/1cls.csv, masks coded 0 / mask_value.

    Layout and CSV as VisA ships them (<object>/Data/Images/{Normal,Anomaly}/*.JPG,
    <object>/Data/Masks/Anomaly/*.png); defects are bright squares, their masks carry
    ``mask_value`` (VisA's masks are not 0/255).
    """
    rng = np.random.default_rng(seed)
    rows = ["object,split,label,image,mask"]
    for k, obj in enumerate(objects):
        base = rng.integers(40, 200, size=3)

        def normal(base: np.ndarray = base) -> np.ndarray:
            return np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(
                np.uint8)

        images = root / obj / "Data" / "Images"
        for i in range(n_train + n_good):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            (images / "Normal").mkdir(parents=True, exist_ok=True)
            Image.fromarray(normal()).save(root / rel, format="JPEG", quality=95)
            rows.append(f"{obj},{'train' if i < n_train else 'test'},normal,{rel},")
        for i in range(n_bad):
            img = normal()
            mask = np.zeros((size, size), dtype=np.uint8)
            y, x = rng.integers(4, size - 16, size=2)
            img[y : y + 12, x : x + 12] = 255 - (k * 20) % 255
            mask[y : y + 12, x : x + 12] = mask_value
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            (images / "Anomaly").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel, format="JPEG", quality=95)
            write_png(root / mrel, mask)
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root
