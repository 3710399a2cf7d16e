"""Names shared by the evaluation outputs and everything that reads them.

Kept free of torch so that readers (aggregate, report, catalog, CLI) start fast: a stage
process that only reads JSON should not pay for importing torch.
"""

from __future__ import annotations

# score definitions of DESIGN.md section 4 (ccnf.scoring computes them); the map scores are
# the ones with a per-patch score (hybrid combines nf and proto)
MAP_SCORES = ("nf", "latent", "proto")
SCORES = ("nf", "latent", "proto", "hybrid")

# task-agnostic class selection methods that need a flow pass (oracle needs none)
SELECT_METHODS = ("likelihood", "prototype")

# per-class metrics of every score (ccnf.evaluate.class_metrics)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1max")
# automatic thresholds (ccnf.scoring.thresholds) and the metrics of the rule score >= threshold
THRESHOLD_KINDS = ("kstd", "pct")
THRESHOLD_METRICS = tuple(
    f"image_{m}_{kind}" for kind in THRESHOLD_KINDS for m in ("precision", "recall", "f1")
)
# chance levels beside them: AP of a random ranking (= defect rate), F1 of flagging every image
CHANCE_METRICS = ("image_ap_chance", "image_f1_all")
# fraction of normal test images at or above the threshold (> 0.5: stale calibration)
FLAGGED_METRICS = tuple(f"image_normal_flagged_{kind}" for kind in THRESHOLD_KINDS)
STALE_FLAGGED = 0.5
ALL_METRICS = METRICS + THRESHOLD_METRICS + CHANCE_METRICS + FLAGGED_METRICS
# metrics are reported to 1e-6: float32 map noise (seen at the 1e-8 level) stays out
DECIMALS = 6
