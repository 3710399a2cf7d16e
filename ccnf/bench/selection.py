"""The class-selection section of ``ccnf bench``: ms per image to choose the class of a test
image among K seen classes with the evaluation's ``select_classes``, and its flow passes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ccnf.bench.harness import count_passes, measure, per_item_ms, synchronizer
from ccnf.bench.stages import fresh_model
from ccnf.config import Params

CLASS_COUNTS = (3, 15, 60)
SELECTION_BATCH = 2


def bench_class_selection(
    params: Params,
    features: Path,
    repeats: int,
    device: torch.device,
    counts: tuple[int, ...] = CLASS_COUNTS,
) -> dict[str, Any]:
    """ms per image to select among K classes: one flow pass per class per batch.

    likelihood: argmax_k mean over patches of log p(x | k) / D_l; prototype: argmin_k
    ||zbar_k - P e_k||^2 / D_l, with zbar_k the spatial mean of z = f(x; e_k) (so it needs the
    same K passes); both on the levels the evaluation selects on (``score.select_level``),
    timed through :func:`ccnf.models.ccnf_scores.select_classes`, the evaluation's own code
    path.
    """
    from ccnf.features import FeatureMeta, load_split
    from ccnf.models.ccnf_scores import select_classes

    meta = FeatureMeta.load(features)
    split = load_split(features, meta.classes[0], "test")
    # the cost per image is linear in the batch; a small batch keeps 60 classes affordable
    b = min(SELECTION_BATCH, params.eval.batch_images, len(split))
    feats = [f[:b].to(device) for f in split.features]
    sync = synchronizer(device)
    # the levels the evaluation selects on (score.select_level: -1 deepest, null all)
    level = params.score.select_level

    def selector(model: Any, k: int, method: str) -> Callable[[], Any]:
        cand = torch.arange(k)
        return lambda: select_classes(model, feats, cand, method, b, level=level)

    # one untimed run first: the timed runs below have no warm-up of their own
    selector(fresh_model(meta, params, 2, device).eval(), 2, "likelihood")()
    out: dict[str, Any] = {
        "batch_images": b, "function": f"{select_classes.__module__}.{select_classes.__name__}",
        "level": level,
    }

    for k in counts:
        model = fresh_model(meta, params, k, device)
        model.eval()
        reps = repeats if k <= 15 else min(repeats, 2)
        out[str(k)] = {
            method + "_ms": per_item_ms(
                measure(selector(model, k, method), reps, warmup=0, sync=sync), b
            )
            for method in ("likelihood", "prototype")
        }
        if k == counts[0]:
            with count_passes(model) as calls:
                selector(model, k, "likelihood")()
            per_level = [sum(lv == lvl for lv, _ in calls) for lvl in range(model.n_levels)]
            out["levels_used"] = [lvl for lvl, n in enumerate(per_level) if n]
            # flow passes per class on each level used (1: every patch of a batch at once)
            out["passes_per_level_per_class"] = max(per_level) / k
    return out
