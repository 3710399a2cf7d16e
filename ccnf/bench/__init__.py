"""``ccnf bench``: where the study's time and memory go, measured side by side in one run.

Not part of the default study (no DVC stage). Every figure is the median of ``repeats``
runs in one process, after one warm-up run where a warm-up means anything; the single runs
are kept in ``bench.json`` so the spread (this machine is shared) is visible.

Sections (keys of ``bench.json``):

* ``extraction``: images/s through the extract stage's code path
  (:func:`ccnf.features.extract_features` on every image of one class: decode, resize, forward,
  cache) vs the bare backbone forward on a batch of ``backbone.batch_size`` decoded images;
* ``training``: flow training throughput (forward + backward + AdamW step of ``L_g`` on one
  step's patch vectors) in feature vectors/s and vectors/s through one coupling block; and
  the wall time of a full task (:func:`ccnf.train.train_task` on task ``t0``);
* ``inference``: per image, ms: backbone, flow (every level, every patch), scoring (the
  per-patch arithmetic after the flow), map post-processing (upsample, level mean, blur, pool)
  and :func:`ccnf.scoring.score_images` as a whole (the evaluation's code path);
  ``passes`` checks that a batch costs one flow pass per level (per class);
* ``class_selection``: ms per image to choose the class of a test image among K seen classes
  (K = 3, 15, 60), ``likelihood`` (argmax_y log p(x|y)) and ``prototype`` (nearest P e_y
  after the pass); both need one flow pass per class;
* ``memory``: peak resident memory and wall time of every DVC stage (from the end-to-end
  runs: each stage's ``python`` runs through a shim that reads ``RUSAGE_CHILDREN``) and the
  size of the feature cache on disk;
* ``e2e``: ``dvc repro`` from nothing vs a params-only ``dvc exp run -S
  loss.lambda_center=0.1`` from the state it left, in a throw-away snapshot of the repository
  with its own DVC cache (``--no-e2e`` skips it and the stage memory);
* ``targets``: each ratio, its target and whether it is met.

Modules: :mod:`.harness` (timing, figures, targets, the flow-pass counter), :mod:`.stages`
(extraction, training, inference), :mod:`.selection` (class selection), :mod:`.e2e` (the
end-to-end runs and stage memory), :mod:`.run` (all sections -> ``bench.json``),
:mod:`.table` (the printed tables) and :mod:`.baselines` (the bank baselines on one class,
``python -m ccnf.bench.baselines``; not imported here).
"""

from ccnf.bench.e2e import SHIM, _read_stage_log, bench_e2e, snapshot_repo, stage_memory
from ccnf.bench.harness import (
    EXPERIMENT,
    TARGETS,
    count_passes,
    dir_size,
    figure,
    measure,
    per_item_ms,
    rate,
    target,
)
from ccnf.bench.run import SCHEMA, run_bench
from ccnf.bench.selection import CLASS_COUNTS, bench_class_selection
from ccnf.bench.stages import bench_extraction, bench_inference, bench_training
from ccnf.bench.table import render

__all__ = [
    "CLASS_COUNTS",
    "EXPERIMENT",
    "SCHEMA",
    "SHIM",
    "TARGETS",
    "_read_stage_log",
    "bench_class_selection",
    "bench_e2e",
    "bench_extraction",
    "bench_inference",
    "bench_training",
    "count_passes",
    "dir_size",
    "figure",
    "measure",
    "per_item_ms",
    "rate",
    "render",
    "run_bench",
    "snapshot_repo",
    "stage_memory",
    "target",
]
