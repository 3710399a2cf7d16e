"""Feature cache: the frozen backbone runs once per image; every later stage reads the cache.

Layout (one directory, written atomically)::

    features/meta.json             backbone, levels, channels, strides, grid sizes, classes
    features/<class>/train.pt      FeatureSplit of the class's train/good images
    features/<class>/test.pt       FeatureSplit of its test images, with labels and masks

A few large files per class keep DVC fast (no file per image). The ``.pt`` files are
pickle-free ``features`` artefacts of :mod:`ccnf.store` (safetensors + JSON, versioned and
checksummed): a damaged or foreign file is one clear error, and non-finite features are
refused both when they would be cached and when they are read.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ccnf.atomic import atomic_path, write_json
from ccnf.backbone import Backbone
from ccnf.config import Params
from ccnf.data.images import load_image, load_image_and_mask
from ccnf.data.manifest import Manifest, Record
from ccnf.device import resolve_device
from ccnf.errors import CcnfError
from ccnf.store import load_artifact, read_json, recovery_fix, save_artifact


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
        raw = read_json(path, what="feature cache index")
        try:
            return FeatureMeta(**raw)
        except TypeError as err:
            raise CcnfError(f"feature cache index {path} has unexpected content ({err})",
                            where=str(path), fix=recovery_fix(path)) from None


_SPLIT_KEYS = {"features", "names", "labels", "defects", "masks"}


def _check_split(raw: object, path: Path, cls: str, split: str) -> FeatureSplit:
    """The FeatureSplit stored in ``raw``, after checking its layout and that it is finite."""
    fix = recovery_fix(path)
    ok = (
        isinstance(raw, dict)
        and set(raw) == _SPLIT_KEYS
        and isinstance(raw["features"], list)
        and all(isinstance(f, torch.Tensor) and f.ndim == 4 for f in raw["features"])
        and isinstance(raw["labels"], torch.Tensor)
        and isinstance(raw["names"], list)
        and isinstance(raw["defects"], list)
        and (raw["masks"] is None or isinstance(raw["masks"], torch.Tensor))
    )
    n = len(raw["names"]) if ok else -1
    if ok:
        ok = all(f.shape[0] == n for f in raw["features"]) and raw["labels"].shape == (n,)
        ok = ok and len(raw["defects"]) == n
        ok = ok and (raw["masks"] is None or raw["masks"].shape[0] == n)
    if not ok:
        raise CcnfError(f"cached features of class '{cls}' ({split}) have an unexpected "
                        f"layout: {path}", where=str(path), fix=fix)
    fs = FeatureSplit(**raw)
    for level, f in enumerate(fs.features):
        finite = torch.isfinite(f)
        if not bool(finite.all()):
            bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
            raise CcnfError(
                f"cached features of class '{cls}' ({split}) hold NaN/Inf: level {level}, "
                f"{int((~finite).sum())} values in {len(bad)} image(s), first "
                f"{fs.names[bad[0]]}",
                where=str(path),
                fix="the backbone output overflowed backbone.feature_dtype or the file was "
                "altered: re-extract (dvc repro --force --single-item extract); with float16 "
                "set backbone.feature_dtype: float32",
            )
    return fs


def load_split(features_dir: Path, cls: str, split: str) -> FeatureSplit:
    """The cached features of one class and split; any damage is one CcnfError naming the file.

    Checks: the artefact is intact (see :mod:`ccnf.store`), has the FeatureSplit layout, and
    every feature is finite (training on NaN/Inf would fail late and far from the cause).
    """
    path = Path(features_dir) / cls / f"{split}.pt"
    if not path.is_file():
        raise CcnfError(
            f"no cached features for class '{cls}' ({split}): {path}",
            fix="the class must be in the split of data.source; re-run: dvc repro extract",
        )
    raw = load_artifact(path, kind="features", fix=recovery_fix(path))
    return _check_split(raw, path, cls, split)


def neighbourhood(features: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """k x k average pooling of each level's maps (N, C, H, W), stride 1, same size; windows
    at the border average only the positions inside the map. k = 1 returns the input as is;
    otherwise float32 (the average of fp16 cache values is computed in float32)."""
    if k == 1:
        return features
    return [
        F.avg_pool2d(f.float(), k, stride=1, padding=k // 2, count_include_pad=False)
        for f in features
    ]


def load_inputs(features_dir: Path, cls: str, split: str, k: int) -> FeatureSplit:
    """The model inputs of one class and split: the cached features after
    ``features.neighbourhood`` pooling (k, see :func:`neighbourhood`)."""
    cached = load_split(features_dir, cls, split)
    cached.features = neighbourhood(cached.features, k)
    return cached


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


def _load_record(
    root: Path, record: Record, size: int, msize: int, with_mask: bool,
    mask_threshold: int = 127,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one image to (3, size, size) float32 in [0, 1] (and its mask when asked).

    ``mask_threshold``: the manifest's mask convention (a pixel above it is a defect).
    """
    if with_mask and record.mask is not None:
        pixels, mask = load_image_and_mask(root / record.image, root / record.mask, size, msize,
                                           mask_threshold)
    else:
        pixels = load_image(root / record.image, size)
        mask = np.zeros((msize, msize), dtype=bool) if with_mask else None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), mask


def _prefetched(
    batches: list[tuple[int, list[Record]]],
    load: Callable[[int, Record], tuple[np.ndarray, np.ndarray | None]],
    workers: int,
    ahead: int = 2,
) -> Iterator[tuple[int, list[Record], list[tuple[np.ndarray, np.ndarray | None]]]]:
    """Yield (job, records, decoded records) batch by batch, in order.

    Decoding (PIL releases the GIL) runs in ``workers`` threads up to ``ahead`` batches in
    front of the consumer, across job boundaries, so it overlaps the backbone forward instead
    of adding to it. Order and content are exactly those of a sequential loop.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        queue: deque[tuple[int, list[Record], list[Future]]] = deque()
        it = iter(batches)
        while True:
            while len(queue) < ahead + 1:
                nxt = next(it, None)
                if nxt is None:
                    break
                job, records = nxt
                queue.append((job, records, [pool.submit(load, job, r) for r in records]))
            if not queue:
                return
            job, records, futures = queue.popleft()
            yield job, records, [f.result() for f in futures]


def _refuse_non_finite(
    feats: torch.Tensor, records: list[Record], cls: str, split: str, level: int,
    dtype: torch.dtype,
) -> None:
    """feats (B, C, H, W) of ``records`` as cached: NaN/Inf are never written to the cache."""
    finite = torch.isfinite(feats).flatten(1).all(1)
    if bool(finite.all()):
        return
    bad = [records[i].image for i in (~finite).nonzero().flatten().tolist()]
    raise CcnfError(
        f"the backbone gives NaN/Inf features (level {level}, as {dtype}) for {len(bad)} "
        f"image(s) of class '{cls}' ({split}): {', '.join(bad[:5])}",
        where=bad[0],
        fix="check those images; if the values overflow float16, set "
        "backbone.feature_dtype: float32",
    )


def _decode_workers(device: torch.device) -> int:
    # on a CPU the forward already uses every core: one decoder thread is enough to hide
    # decoding; a GPU forward is so fast that decoding is the bottleneck, so use more
    if device.type == "cpu":
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def extract_features(
    manifest: Manifest,
    params: Params,
    out_dir: Path,
    *,
    console: Console | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Run the backbone over every image of the split's classes; write the cache atomically.

    ``device`` defaults to ``params.device`` resolved (:func:`ccnf.device.resolve_device`);
    features are cached on the CPU either way, and a CPU run is bit-for-bit the reference.
    Returns throughput figures: images, seconds, images/s of the stage and of the bare
    backbone forward (the ratio is the cost of decoding, resizing and caching), and the
    seconds spent building the backbone (not counted in either rate).
    """
    device = resolve_device(params.device) if device is None else device
    torch.manual_seed(params.seed)
    t_build = time.perf_counter()
    backbone = Backbone(params.backbone).to(device)
    build_s = time.perf_counter() - t_build
    root = Path(manifest.root)
    classes = params.classes
    jobs = [(c, s, manifest.select(c, s)) for c in classes for s in ("train", "test")]
    total = sum(len(r) for _, _, r in jobs)
    bs = params.backbone.batch_size
    dtype = getattr(torch, params.backbone.feature_dtype)
    size, msize = params.data.image_size, params.data.mask_size
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, size, size, device=device))
        grids = [list(f.shape[-2:]) for f in probe]
    # every job (class, split) in batches of backbone.batch_size, the last one partial: batch
    # composition stays exactly that of one loop per job, so the features stay byte-identical
    batches = [
        (j, records[i : i + bs])
        for j, (_, _, records) in enumerate(jobs)
        for i in range(0, len(records), bs)
    ]
    remaining = [len(records) for _, _, records in jobs]
    levels: list[list[torch.Tensor]] = []
    masks: list[np.ndarray] = []

    def load(job: int, record: Record) -> tuple[np.ndarray, np.ndarray | None]:
        return _load_record(root, record, size, msize, with_mask=jobs[job][1] == "test",
                            mask_threshold=manifest.mask_threshold)

    counts: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    forward_s = 0.0
    with atomic_path(out_dir) as tmp, _progress(console) as progress:
        task_id = progress.add_task("extracting features", total=total, rate="")
        for job, records, decoded in _prefetched(batches, load, _decode_workers(device)):
            cls, split, job_records = jobs[job]
            if not levels:
                levels = [[] for _ in backbone.channels]
                masks = []
                progress.update(task_id, description=f"extract {cls}/{split}")
            x = torch.from_numpy(np.stack([img for img, _ in decoded]))
            t0 = time.perf_counter()
            feats = backbone(x.to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s += time.perf_counter() - t0
            for lvl, f in enumerate(feats):
                cached = f.to(dtype).cpu()
                _refuse_non_finite(cached, records, cls, split, lvl, dtype)
                levels[lvl].append(cached)
            masks.extend(m for _, m in decoded if m is not None)
            progress.advance(task_id, len(records))
            remaining[job] -= len(records)
            if remaining[job]:
                continue
            fs = FeatureSplit(
                features=[torch.cat(level) for level in levels],
                names=[r.image for r in job_records],
                labels=torch.tensor([r.label for r in job_records], dtype=torch.long),
                defects=[r.defect for r in job_records],
                masks=torch.from_numpy(np.stack(masks)) if split == "test" else None,
            )
            levels, masks = [], []
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            save_artifact(tmp / cls / f"{split}.pt", fs.__dict__, kind="features")
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
        "build_seconds": build_s,
        "stage_images_per_s": total / elapsed,
        "forward_images_per_s": total / max(forward_s, 1e-9),
    }
