"""The dataset on disk: one seeded generator per image, the job list (classes, splits,
defect kinds), and :func:`generate`, which writes it in MVTec AD layout atomically."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ccnf.atomic import atomic_path
from ccnf.config import SyntheticConfig
from ccnf.data.synthetic.classes import CLASS_INFO, DEFECT_KINDS, SYNTHETIC_CLASSES
from ccnf.data.synthetic.image import synthesize

_SPLIT_CODE = {"train": 0, "test_good": 1, "test_defect": 2}


def _image_rng(seed: int, cls: str, split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cls.encode()), _SPLIT_CODE[split], kind, index])


def _defect_counts(cls: str, n_defect: int) -> list[tuple[str, int]]:
    """Spread ``n_defect`` images over the class's defect kinds (first kinds get the rest)."""
    kinds = CLASS_INFO[cls].defects
    base, extra = divmod(n_defect, len(kinds))
    return [(kind, base + (i < extra)) for i, kind in enumerate(kinds) if base + (i < extra)]


def _save_png(path: Path, array: NDArray[np.uint8]) -> None:
    # no text chunks, no timestamp: identical arrays give identical bytes
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _jobs(cfg: SyntheticConfig) -> list[tuple[str, str, str | None, int]]:
    jobs: list[tuple[str, str, str | None, int]] = []
    for cls in SYNTHETIC_CLASSES:
        jobs += [(cls, "train", None, i) for i in range(cfg.n_train)]
        jobs += [(cls, "test_good", None, i) for i in range(cfg.n_test_good)]
        for kind, n in _defect_counts(cls, cfg.n_test_defect):
            jobs += [(cls, "test_defect", kind, i) for i in range(n)]
    return jobs


def _write_one(root: Path, cfg: SyntheticConfig, job: tuple[str, str, str | None, int]) -> None:
    cls, split, defect, i = job
    kind = DEFECT_KINDS.index(defect) + 1 if defect else 0
    rng = _image_rng(cfg.seed, cls, split, kind, i)
    img, mask = synthesize(cls, cfg.image_size, rng, defect)
    name = f"{i:03d}.png"
    if split == "train":
        _save_png(root / cls / "train" / "good" / name, img)
    elif defect is None:
        _save_png(root / cls / "test" / "good" / name, img)
    else:
        assert mask is not None
        _save_png(root / cls / "test" / defect / name, img)
        _save_png(
            root / cls / "ground_truth" / defect / f"{i:03d}_mask.png",
            mask.astype(np.uint8) * np.uint8(255),
        )


def _write_chunk(
    root: Path, cfg: SyntheticConfig, jobs: list[tuple[str, str, str | None, int]]
) -> int:
    for job in jobs:
        _write_one(root, cfg, job)
    return len(jobs)


def generate(
    out_dir: Path, cfg: SyntheticConfig, *, progress: bool = True, workers: int | None = None
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (replaced atomically); return a summary.

    The summary maps each class to its image counts: ``{"train": n, "test_good": n,
    "defects": {kind: n}}``, plus the totals and the config used. ``workers`` processes share
    the work (default: up to 2, one for small sets); every image has its own seed, so the
    output does not depend on it.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    out_dir = Path(out_dir)
    jobs = _jobs(cfg)
    if workers is None:
        workers = 1 if len(jobs) < 300 else min(2, os.cpu_count() or 1)
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1
    chunks = [jobs[i : i + 25] for i in range(0, len(jobs), 25)]
    with atomic_path(out_dir) as tmp:
        for cls in SYNTHETIC_CLASSES:
            (tmp / cls / "train" / "good").mkdir(parents=True)
            (tmp / cls / "test" / "good").mkdir(parents=True)
            for kind, _ in _defect_counts(cls, cfg.n_test_defect):
                (tmp / cls / "test" / kind).mkdir(parents=True)
                (tmp / cls / "ground_truth" / kind).mkdir(parents=True)
        with Progress(
            TextColumn("generating synthetic data"),
            BarColumn(),
            MofNCompleteColumn(),
            disable=not progress,
            transient=True,
        ) as bar:
            task = bar.add_task("generate", total=len(jobs))
            if workers <= 1:
                for chunk in chunks:
                    bar.advance(task, _write_chunk(tmp, cfg, chunk))
            else:
                # fork: the workers only run numpy/scipy/PIL, and unlike spawn it does not
                # re-import the caller's __main__ (which need not be import-safe)
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    futures = [pool.submit(_write_chunk, tmp, cfg, c) for c in chunks]
                    for fut in futures:
                        bar.advance(task, fut.result())
    classes = {
        cls: {
            "kind": CLASS_INFO[cls].kind,
            "colour": CLASS_INFO[cls].colour,
            "train": cfg.n_train,
            "test_good": cfg.n_test_good,
            "defects": dict(_defect_counts(cls, cfg.n_test_defect)),
        }
        for cls in SYNTHETIC_CLASSES
    }
    return {
        "root": str(out_dir),
        "config": cfg.model_dump(),
        "n_classes": len(classes),
        "n_images": len(jobs),
        "classes": classes,
    }
