"""What each model costs on the default data: parameters, checkpoint bytes, training and
inference time. The memory/time half of the baselines comparison (issue 4, REPORT.md).

    .venv/bin/python benchmarks/model_costs.py [--classes weave,granite,twill] [--out FILE]

CCNF: the whole 5-task chain is trained in a temporary directory from the workspace's feature
cache (the train stage's own code), parameters and bytes are those of the final checkpoint, and
inference is the task-aware scoring of one class's test images with the final model. A bank
(gaussian, flow_bank, fastflow): each listed class is fitted and scored alone
(:func:`ccnf.bench.baselines.measure_baseline`); a bank of the 15 classes holds 15 such models
of the same shape, so its parameters and bytes are 15 x one class's (exact up to the
container's few hundred bytes), and its training time is 15 x the mean fit time (an estimate,
stated as such).
One torch thread (params ``threads``), CPU. Needs ``dvc repro`` (features/) first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ccnf.atomic import write_json
from ccnf.bench.baselines import measure_baseline
from ccnf.config import load_params
from ccnf.features import load_inputs
from ccnf.flows.ccnf import CCNF, read_checkpoint
from ccnf.models.ccnf import ccnf_spec
from ccnf.scoring import score_images, unit_fusion_stats
from ccnf.train import init_model, train_task

KINDS = ("gaussian", "flow_bank", "fastflow")


def ccnf_costs(params_path: Path, features: Path, cls: str) -> dict[str, float | str]:
    params = load_params(params_path)
    torch.set_num_threads(params.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_model(params, features, root / "init")
        prev, seconds = root / "init", 0.0
        for task in params.task_names:
            start = time.perf_counter()
            train_task(params, task, features, prev, root / task)
            seconds += time.perf_counter() - start
            prev = root / task
        ckpt = read_checkpoint(prev)
        size = (prev / "model.pt").stat().st_size
    model = CCNF.from_checkpoint(ckpt, ccnf_spec(params.flow, ckpt["channels"]))
    test = load_inputs(features, cls, "test", params.features.neighbourhood)
    cid = params.classes.index(cls)
    start = time.perf_counter()
    score_images(model, test.features, torch.full((len(test),), cid), params.score,
                 params.data.mask_size, params.eval.batch_images,
                 unit_fusion_stats(len(test), [tuple(f.shape[-2:]) for f in test.features]))
    score_s = time.perf_counter() - start
    return {
        "kind": "ccnf",
        "n_parameters": sum(v.numel() for v in ckpt["state_dict"].values()
                            if v.is_floating_point()),
        "checkpoint_bytes": size,
        "train_s": round(seconds, 1),
        "train_s_note": "measured: the 5 chained tasks",
        "score_ms_per_image": round(1000 * score_s / len(test), 2),
    }


def bank_costs(kind: str, raw: dict, features: Path, classes: list[str],
               n_classes: int) -> dict[str, float | str]:
    rows = [measure_baseline(kind, cls, raw, features) for cls in classes]
    fit = statistics.mean(float(r["fit_s"]) for r in rows)
    return {
        "kind": kind,
        "n_parameters": int(rows[0]["n_parameters"]) * n_classes,
        "checkpoint_bytes": int(rows[0]["checkpoint_bytes"]) * n_classes,
        "train_s": round(fit * n_classes, 1),
        "train_s_note": f"{n_classes} x mean fit time of {', '.join(classes)}",
        "score_ms_per_image": round(statistics.median(float(r["score_ms_per_image"])
                                                      for r in rows), 2),
    }


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--features", type=Path, default=Path("features"))
    ap.add_argument("--classes", default="weave,granite,twill")
    ap.add_argument("--out", type=Path, default=Path("docs/report/model_costs.json"))
    args = ap.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(params.threads)
    raw = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    classes = args.classes.split(",")
    out = [ccnf_costs(args.params, args.features, classes[0])]
    print(json.dumps(out[-1]), flush=True)
    for kind in KINDS:
        out.append(bank_costs(kind, raw, args.features, classes, len(params.classes)))
        print(json.dumps(out[-1]), flush=True)
    write_json(args.out, {"device": "cpu", "threads": params.threads, "models": out})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
