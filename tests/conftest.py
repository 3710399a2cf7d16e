"""Shared fixtures: tiny MVTec-layout datasets and params for fast end-to-end tests."""

from __future__ import annotations

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


def tiny_params(root: Path, classes: list[list[str]]) -> dict[str, Any]:
    """Params for a fast run on a tiny MVTec-layout root with the given task split."""
    p = default_params()
    p["data"].update(source="mvtec", root=str(root), image_size=64, mask_size=32)
    p["splits"]["mvtec"] = classes
    p["splits"]["synthetic"] = classes
    p["tasks"] = {
        f"t{i}": {"prev": "models/init" if i == 0 else f"models/t{i - 1}"}
        for i in range(len(classes))
    }
    p["backbone"]["batch_size"] = 8
    p["flow"].update(n_couplings=2, hidden_dim=16, embedding_dim=8, pos_dim=8, warmup_steps=4)
    p["train"].update(epochs=1, images_per_step=4, patches_per_image=16)
    p["loss"]["entropy_samples"] = 16
    p["eval"]["batch_images"] = 4
    return p
