"""The pipeline sections of ``ccnf bench``, each through its stage's own code: extraction
(the extract stage vs the bare backbone forward), flow training (step throughput and a full
task) and inference (backbone, flow pass, scoring, map post-processing, ``score_images``,
and a check that a batch costs one flow pass per level).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from ccnf.bench.harness import (
    count_passes,
    figure,
    measure,
    per_item_ms,
    rate,
    synchronizer,
)
from ccnf.config import Params, parse_params
from ccnf.data.manifest import Manifest
from ccnf.models.ccnf import ccnf_spec
from ccnf.optim import AdamW

QUIET = Console(quiet=True)


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
            sub_manifest, sub, out_dir / f"features_{i}", console=QUIET, device=device
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
    fwd = measure(lambda: backbone(x), repeats, sync=synchronizer(device))
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


def fresh_model(meta: Any, params: Params, n_classes: int, device: torch.device) -> Any:
    """A freshly initialised CCNF with n_classes rows, past its warm-up (fully affine)."""
    from ccnf.flows.ccnf import CCNF

    torch.manual_seed(params.seed)
    spec = ccnf_spec(params.flow, meta.channels)
    model = CCNF(meta.channels, meta.grids, spec, n_classes=n_classes).to(device)
    model.global_step.fill_(params.flow.warmup_steps)
    return model


def patch_batch(feat: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
    model = fresh_model(meta, params, 3, device)
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
    secs = measure(lambda: [step() for _ in range(steps)], repeats, sync=synchronizer(device))
    secs = [s / steps for s in secs]
    vectors = sum(len(x) for x, _ in batches)
    n_levels = len(batches)
    couplings = [params.flow.couplings_at(lvl, n_levels) for lvl in range(n_levels)]
    # each level's vectors pass through that level's own number of coupling blocks
    block_passes = sum(len(x) * c for (x, _), c in zip(batches, couplings, strict=True))
    section: dict[str, Any] = {
        "vectors_per_step": vectors,
        "n_couplings": couplings,
        "hidden_dim": [
            params.flow.hidden_at(lvl, n_levels, x.shape[1]) for lvl, (x, _) in enumerate(batches)
        ],
        "step_ms": figure([1000 * s for s in secs], "ms", 2),
        "vectors_per_s": rate(secs, vectors, "vectors/s"),
        "vectors_per_s_per_coupling": rate(
            secs, block_passes, "vectors/s through one coupling block"
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
    task_s, step_ms, steps_done = [], [], 0.0
    for i in range(task_repeats):
        t0 = time.perf_counter()
        stats = train_task(task_params, task, task_features, init_dir, out_dir / f"task_{i}")
        task_s.append(time.perf_counter() - t0)
        steps_done = stats.get("steps", float("nan"))
        # the optimizer steps alone (train_task times learning apart from loading, calibration
        # and writing): what the catalog's step count is multiplied by
        step_ms.append(1000 * stats["seconds"] / steps_done if steps_done else float("nan"))
        shutil.rmtree(out_dir / f"task_{i}", ignore_errors=True)
    section["task"] = {
        "task": task,
        "classes": task_params.split[0],
        "features": "full cache" if use_full else "bench subset (first class only)",
        "steps": steps_done,
        "seconds": figure(task_s, "s", 2),
        "ms_per_step": figure(step_ms, "ms", 2),
    }
    return section


def bench_inference(
    params: Params,
    features: Path,
    backbone_ms: float,
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-image cost of scoring a test batch, split into its parts."""
    from ccnf.features import FeatureMeta, load_split
    from ccnf.scoring import gaussian_blur, pool, score_images, unit_fusion_stats

    meta = FeatureMeta.load(features)
    split = load_split(features, meta.classes[0], "test")
    b = min(params.eval.batch_images, len(split))
    feats = [f[:b].to(device) for f in split.features]
    n_classes = len(params.classes)
    model = fresh_model(meta, params, n_classes, device)
    model.eval()
    cid = n_classes - 1
    y_img = torch.full((b,), cid, dtype=torch.long, device=device)
    size, sigma = params.data.mask_size, params.score.smoothing_sigma
    batch = [patch_batch(f, device) for f in feats]
    ys = [y_img.repeat_interleave(len(x) // b) for x, _ in batch]
    sync = synchronizer(device)

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

    # same arithmetic as real calibration statistics
    unit = unit_fusion_stats(b, [tuple(f.shape[-2:]) for f in feats])

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
        with count_passes(model) as calls:
            whole()
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
