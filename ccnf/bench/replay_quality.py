"""How good are the features generative replay trains on? (issue 13)

    .venv/bin/python -m ccnf.bench.replay_quality [--model models/t0] [--classes a,b]
        [--per-class 32] [--tau 0.6,0.8,1.0] [--out FILE]

For each class the checkpoint knows (or those listed), the flow generates ``per-class`` feature
maps exactly as ``train.strategy: generative_replay`` does before a task
(:func:`ccnf.models.ccnf.generate_task_data`). The check is a Gaussian floor (the per-position
Gaussian baseline) fitted on those generated maps and tested on the class's real test images,
beside the same floor fitted on the class's real fit images: if the samples carry the class's
normal distribution, the two AUROCs agree. Also printed per level: how far the generated
channel means are from the real ones (in real standard deviations) and the ratio of the
standard deviations (1 = the same spread). The generated maps are never written anywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ccnf.atomic import write_json
from ccnf.bench.baselines import bank_params, fit_and_score
from ccnf.config import Params
from ccnf.device import resolve_device
from ccnf.errors import CcnfError
from ccnf.features import FeatureMeta, load_inputs
from ccnf.models import read_checkpoint, restore_model
from ccnf.models.ccnf import CCNFModel, generate_task_data
from ccnf.seeding import stream_seed
from ccnf.train import calibration_split


def moment_gap(real: torch.Tensor, generated: torch.Tensor) -> dict[str, float]:
    """real, generated: (N, D, H, W). Mean over channels and positions of |mean_gen - mean_real|
    / std_real, and of std_gen / std_real."""
    r, g = real.float(), generated.float()
    std = r.std(dim=0).clamp_min(1e-6)
    return {
        "mean_gap_in_std": round(float(((g.mean(dim=0) - r.mean(dim=0)).abs() / std).mean()), 4),
        "std_ratio": round(float((g.std(dim=0) / std).mean()), 4),
    }


def replay_quality(
    params: Params, raw: dict, model_dir: Path, features_dir: Path, classes: list[str] | None,
    per_class: int, taus: list[float],
) -> list[dict[str, Any]]:
    """One row per class and tau (plus a ``real`` row per class); see the module docstring."""
    meta = FeatureMeta.load(features_dir)
    ckpt = read_checkpoint(model_dir)
    model = restore_model(ckpt, params, meta, resolve_device(params.device),
                          where=str(model_dir / "model.pt"))
    if not isinstance(model, CCNFModel):
        raise CcnfError(f"{model_dir} holds a '{ckpt['kind']}' model; only the shared flow "
                        "generates features", fix="point --model at a CCNF checkpoint")
    net = model.net.to(model.device).eval()
    wanted = classes or model.classes
    unknown = [c for c in wanted if c not in model.classes]
    if unknown:
        raise CcnfError(f"{model_dir} has not learned {', '.join(unknown)}",
                        fix=f"use classes of {', '.join(model.classes)}")
    floor = bank_params(raw, "gaussian")
    k = params.features.neighbourhood
    rows: list[dict[str, Any]] = []
    for cls in wanted:
        train = load_inputs(features_dir, cls, "train", k)
        fit_idx, calib_idx = calibration_split(len(train), params.eval.calib_fraction,
                                               params.seed)
        fit, calib = train.subset(fit_idx).features, train.subset(calib_idx).features
        test = load_inputs(features_dir, cls, "test", k)
        real = fit_and_score(floor, meta, cls, fit, calib, test)
        rows.append({"class": cls, "source": "real", "images": len(fit_idx),
                     "image_auroc": real["image_auroc"], "pixel_auroc": real["pixel_auroc"]})
        cid = model.classes.index(cls)
        for tau in taus:
            gen = torch.Generator().manual_seed(stream_seed(params.seed, "generate", cid))
            data = generate_task_data(net, [cid], per_class, tau, gen, targets=None)
            maps = [f.cpu().transpose(1, 2).reshape(per_class, f.shape[2], *grid)
                    for f, grid in zip(data.feats, meta.grids, strict=True)]
            got = fit_and_score(floor, meta, cls, maps, calib, test)
            gaps = [moment_gap(r.float(), g) for r, g in zip(fit, maps, strict=True)]
            rows.append({
                "class": cls, "source": f"tau {tau}", "images": per_class,
                "image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"],
                **{f"level{lvl}_{k_}": v for lvl, g in enumerate(gaps) for k_, v in g.items()},
            })
    return rows


def _table(rows: list[dict[str, Any]], model_dir: Path) -> Table:
    table = Table(title=f"Gaussian floor fitted on generated (tau) vs real features, tested on "
                        f"real test images ({model_dir}); gaps in real std")
    extra = [k for k in rows[-1] if k.startswith("level")]
    short = {"class": "class", "source": "fitted on", "images": "maps", "image AUROC": "image",
             "pixel AUROC": "pixel"} | {
        k: k.replace("level", "L").replace("_mean_gap_in_std", " mean gap")
        .replace("_std_ratio", " std ratio") for k in extra}
    for col in ("class", "source", "images", "image AUROC", "pixel AUROC", *extra):
        table.add_column(short[col], justify="left" if col in ("class", "source") else "right")
    for r in rows:
        table.add_row(r["class"], r["source"], str(r["images"]), f"{r['image_auroc']:.4f}",
                      f"{r['pixel_auroc']:.4f}", *(f"{r[k]:.3f}" if k in r else "" for k in extra))
    return table


def main() -> None:
    from ccnf.catalog import apply_overrides
    from ccnf.config import parse_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/t0"))
    ap.add_argument("--classes", default=None, help="comma-separated (default: all it knows)")
    ap.add_argument("--per-class", type=int, default=None,
                    help="generated maps per class (default: train.generated_per_class)")
    ap.add_argument("--tau", default=None, help="comma-separated (default: generation_tau)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--features", type=Path, default=Path("features"))
    ap.add_argument("--set", action="append", default=[], help="override: section.key=value")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    raw = apply_overrides(yaml.safe_load(args.params.read_text(encoding="utf-8")), args.set)
    params = parse_params(raw, str(args.params))
    torch.set_num_threads(params.threads)
    taus = ([float(t) for t in args.tau.split(",")] if args.tau
            else [params.train.generation_tau])
    rows = replay_quality(params, raw, args.model, args.features,
                          args.classes.split(",") if args.classes else None,
                          args.per_class or params.train.generated_per_class, taus)
    Console().print(_table(rows, args.model))
    if args.out:
        write_json(args.out, {"model": str(args.model), "rows": rows})
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    try:
        main()
    except CcnfError as err:
        Console(stderr=True).print(f"[red]error:[/] {err.render()}")
        raise SystemExit(1) from None
