"""Measure the bank baselines on one class of the real feature cache (no DVC, no side effects).

    .venv/bin/python -m ccnf.bench.baselines --cls weave [--kinds gaussian,flow_bank,fastflow]
        [--set train.epochs=16 --set flow.feature_norm=true]

Per kind: fit time on the class's fit split (the training images minus the calibration slice,
exactly as the train stage splits them), scoring time per test image, image and pixel AUROC of
the ``nf``-style map (patch scores -> upsample -> level mean -> blur -> pooling), stored
parameters and checkpoint bytes of the class's model. Prints one JSON object per kind.
benchmarks/model_costs.py builds the memory/time comparison of the baselines on it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from ccnf.baselines.bank import ClassBank
from ccnf.baselines.maps import bank_patch_scores
from ccnf.catalog import apply_overrides
from ccnf.config import Params, parse_params
from ccnf.features import FeatureMeta, FeatureSplit, load_inputs
from ccnf.metrics import auroc
from ccnf.models.bank import model_spec
from ccnf.schedule import TrainSpec
from ccnf.scoring import assemble, calibration_record, fusion_stats_of, stack_stats
from ccnf.seeding import class_seed
from ccnf.train import calibration_split


def bank_params(raw: dict, kind: str) -> Params:
    """Params for one bank model of ``kind`` scoring one class alone (no class selection
    happens, and a bank cannot select by prototype)."""
    return parse_params({
        **raw,
        "model": {**raw.get("model", {}), "kind": kind},
        "score": {**raw.get("score", {}), "class_select": "likelihood"},
    })


def fit_and_score(
    params: Params, meta: FeatureMeta, cls: str, fit: list[torch.Tensor],
    calib: list[torch.Tensor], test: FeatureSplit,
) -> dict[str, float | int]:
    """Fit ``params.model.kind``'s per-class model on features ``fit`` (per level
    (N, C_l, H_l, W_l)), calibrate on ``calib`` and score ``test``: times, steps, AUROCs of the
    headline map (patch scores -> upsample -> level fusion -> blur -> pooling) and sizes."""
    bank = ClassBank(params.model.kind, model_spec(params, meta.channels, meta.grids))
    t0 = time.perf_counter()
    rows = bank.add_class(cls, fit, TrainSpec.of(params.train), class_seed(params.seed, 0))
    fit_s = time.perf_counter() - t0
    batch, size = params.eval.batch_images, params.data.mask_size
    record = calibration_record(bank_patch_scores(bank[cls], calib, batch).to_record(),
                                params.score, size, cls=cls)
    t0 = time.perf_counter()
    scores = assemble(bank_patch_scores(bank[cls], test.features, batch), params.score, size,
                      fusion_stats_of(stack_stats({cls: record}, [cls] * len(test))))
    score_s = time.perf_counter() - t0
    headline = params.score.headline
    assert test.masks is not None
    return {
        "fit_s": round(fit_s, 3),
        "fit_s_per_epoch": round(fit_s / params.train.epochs, 3) if rows else 0.0,
        "steps": len(rows),
        "final_loss": round(rows[-1]["loss"], 4) if rows else float("nan"),
        "score_ms_per_image": round(1000 * score_s / len(test), 2),
        "image_auroc": round(auroc(test.labels.numpy(), scores.images[headline]), 4),
        "pixel_auroc": round(auroc(test.masks.numpy(), scores.maps[headline]), 4),
        "n_parameters": bank.n_parameters(cls),
        "checkpoint_bytes": bank.checkpoint_nbytes(cls),
    }


def measure_baseline(kind: str, cls: str, raw: dict, features_dir: Path
                     ) -> dict[str, float | str]:
    """Fit one bank model of ``kind`` on class ``cls`` and score its test images: times, AUROCs
    and sizes (``raw``: the params as read from params.yaml, overrides applied)."""
    params = bank_params(raw, kind)
    meta = FeatureMeta.load(features_dir)
    train = load_inputs(features_dir, cls, "train", params.features.neighbourhood)
    fit_idx, calib_idx = calibration_split(len(train), params.eval.calib_fraction, params.seed)
    test = load_inputs(features_dir, cls, "test", params.features.neighbourhood)
    out = fit_and_score(params, meta, cls, train.subset(fit_idx).features,
                        train.subset(calib_idx).features, test)
    return {"kind": kind, "class": cls, "fit_images": len(fit_idx), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cls", default="weave")
    ap.add_argument("--kinds", default="gaussian,flow_bank,fastflow")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--features", type=Path, default=Path("features"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings)")
    ap.add_argument("--set", action="append", default=[], help="override: section.key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = apply_overrides(yaml.safe_load(args.params.read_text(encoding="utf-8")), args.set)
    for kind in args.kinds.split(","):
        row = measure_baseline(kind, args.cls, raw, args.features)
        print(json.dumps({**row, "overrides": args.set}), flush=True)


if __name__ == "__main__":
    main()
