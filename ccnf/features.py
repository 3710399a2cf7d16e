"""Feature cache: the frozen backbone runs once per image; every later stage reads the cache.

Layout (one directory, written atomically)::

    features/meta.json             backbone, levels, channels, strides, grid sizes, classes
    features/<class>/train.pt      FeatureSplit of the class's train/good images
    features/<class>/test.pt       FeatureSplit of its test images, with labels and masks

A few large files per class keep DVC fast (no file per image).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ccnf.atomic import atomic_path, write_json
from ccnf.backbone import Backbone
from ccnf.config import Params
from ccnf.data.images import load_image, load_mask
from ccnf.data.manifest import Manifest, Record
from ccnf.errors import CcnfError


@dataclass
class FeatureSplit:
    """Cached backbone features of one class and split.

    features[l]: (N, C_l, H_l, W_l) in the cache dtype; names: N image paths (root-relative);
    labels: (N,) int64, 1 = defective; defects: N defect types; masks: (N, S, S) bool at
    ``data.mask_size`` for test splits, None for train.
    """

    features: list[torch.Tensor]
    names: list[str]
    labels: torch.Tensor
    defects: list[str]
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: torch.Tensor | list[int]) -> FeatureSplit:
        idx = torch.as_tensor(index, dtype=torch.long)
        return FeatureSplit(
            features=[f[idx] for f in self.features],
            names=[self.names[i] for i in idx.tolist()],
            labels=self.labels[idx],
            defects=[self.defects[i] for i in idx.tolist()],
            masks=None if self.masks is None else self.masks[idx],
        )


@dataclass(frozen=True)
class FeatureMeta:
    backbone: str
    out_indices: list[int]
    channels: list[int]
    strides: list[int]
    grids: list[list[int]]  # (H_l, W_l) per level
    image_size: int
    mask_size: int
    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @staticmethod
    def load(features_dir: Path) -> FeatureMeta:
        path = Path(features_dir) / "meta.json"
        if not path.is_file():
            raise CcnfError(f"feature cache not found: {path}", fix="run: dvc repro extract")
        return FeatureMeta(**json.loads(path.read_text()))


def load_split(features_dir: Path, cls: str, split: str) -> FeatureSplit:
    path = Path(features_dir) / cls / f"{split}.pt"
    if not path.is_file():
        raise CcnfError(
            f"no cached features for class '{cls}' ({split}): {path}",
            fix="the class must be in the split of data.source; re-run: dvc repro extract",
        )
    return FeatureSplit(**torch.load(path, map_location="cpu", weights_only=False))


def _progress(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _extract_records(
    backbone: Backbone,
    root: Path,
    records: list[Record],
    params: Params,
    progress: Progress,
    task_id: int,
    with_masks: bool,
) -> tuple[FeatureSplit, float]:
    bs = params.backbone.batch_size
    dtype = getattr(torch, params.backbone.feature_dtype)
    size, msize = params.data.image_size, params.data.mask_size
    levels: list[list[torch.Tensor]] = [[] for _ in backbone.channels]
    masks: list[np.ndarray] = []
    forward_s = 0.0
    for start in range(0, len(records), bs):
        batch = records[start : start + bs]
        images = np.stack([load_image(root / r.image, size) for r in batch])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        t0 = time.perf_counter()
        feats = backbone(x)
        forward_s += time.perf_counter() - t0
        for lvl, f in enumerate(feats):
            levels[lvl].append(f.to(dtype))
        if with_masks:
            for r in batch:
                if r.mask is None:
                    masks.append(np.zeros((msize, msize), dtype=bool))
                else:
                    masks.append(load_mask(root / r.mask, msize))
        progress.advance(task_id, len(batch))
    split = FeatureSplit(
        features=[torch.cat(level) for level in levels],
        names=[r.image for r in records],
        labels=torch.tensor([r.label for r in records], dtype=torch.long),
        defects=[r.defect for r in records],
        masks=torch.from_numpy(np.stack(masks)) if with_masks else None,
    )
    return split, forward_s


def extract_features(
    manifest: Manifest, params: Params, out_dir: Path, *, console: Console | None = None
) -> dict[str, float]:
    """Run the backbone over every image of the split's classes; write the cache atomically.

    Returns throughput figures: images, seconds, images/s of the stage and of the bare
    backbone forward (the ratio is the cost of decoding, resizing and caching).
    """
    torch.manual_seed(params.seed)
    backbone = Backbone(params.backbone)
    root = Path(manifest.root)
    classes = params.classes
    jobs = [(c, s, manifest.select(c, s)) for c in classes for s in ("train", "test")]
    total = sum(len(r) for _, _, r in jobs)
    grids = []
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, params.data.image_size, params.data.image_size))
        grids = [list(f.shape[-2:]) for f in probe]
    counts: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    forward_s = 0.0
    with atomic_path(out_dir) as tmp, _progress(console) as progress:
        task_id = progress.add_task("extracting features", total=total, rate="")
        for cls, split, records in jobs:
            progress.update(task_id, description=f"extract {cls}/{split}")
            fs, secs = _extract_records(
                backbone, root, records, params, progress, task_id, with_masks=(split == "test")
            )
            forward_s += secs
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            torch.save(fs.__dict__, tmp / cls / f"{split}.pt")
            counts.setdefault(cls, {})[split] = len(fs)
            done = progress.tasks[0].completed
            progress.update(task_id, rate=f"{done / (time.perf_counter() - start):.1f} img/s")
        meta = FeatureMeta(
            backbone=params.backbone.name,
            out_indices=list(params.backbone.out_indices),
            channels=backbone.channels,
            strides=backbone.strides,
            grids=grids,
            image_size=params.data.image_size,
            mask_size=params.data.mask_size,
            classes=classes,
            counts=counts,
        )
        write_json(tmp / "meta.json", meta.__dict__)
    elapsed = time.perf_counter() - start
    return {
        "images": float(total),
        "seconds": elapsed,
        "stage_images_per_s": total / elapsed,
        "forward_images_per_s": total / max(forward_s, 1e-9),
    }
