"""The variant catalog: every experiment of the study as a named set of params overrides.

``catalog.yaml`` (repository root) names each experiment by its id (E0, E1, ... P6) and lists
its overrides in the syntax of ``dvc exp run -S`` (Hydra: ``key=value``, YAML-typed values).
This package

* loads and validates the catalog (:mod:`.schema`): each override must be a plain
  ``key=value`` on a key of the params schema, and params.yaml with an experiment's overrides
  applied must pass :func:`ccnf.config.parse_params` (errors name the experiment id and the key);
* applies overrides to a raw params dict exactly as ``dvc exp run -S`` does (:mod:`.overrides`;
  same parser: Hydra's, which DVC uses; the tests compare with a real ``dvc exp run``);
* runs any subset through DVC's experiment machinery (:mod:`.runner`, calling DVC through
  :mod:`.commands` and watching its queue through :mod:`.polling`): ``dvc exp run --temp`` one
  after the other, or ``dvc exp run --queue`` + ``dvc queue start -j N``, replacing an earlier
  experiment of the same name, and records the wall time;
* reads DVC's own experiment records (``dvc exp show --json``) back into rows for the
  comparison table (:mod:`.records`; :mod:`ccnf.study_report` renders them).

The names below are re-exported so that ``from ccnf.catalog import ...`` keeps working; the
queue's poll intervals (``POLL_S`` ...) live in :mod:`ccnf.catalog.runner`, where they are read.
"""

from ccnf.catalog.commands import (
    STAGE_RE,
    dvc,
    dvc_env,
    existing_names,
    run_leaving_children,
)
from ccnf.catalog.overrides import apply_overrides, parse_override, read_yaml, schema_key_error
from ccnf.catalog.polling import (
    WORKER_RE,
    QueueStatus,
    live_workers,
    parse_queue_status,
    queue_status,
    queued_names,
    workers_alive,
)
from ccnf.catalog.records import (
    SCORE_DEFS,
    SUMMARY_FILE,
    ExpRecord,
    Row,
    load_records,
    match_records,
    params_mismatch,
    parse_exp_show,
    record_baselines,
)
from ccnf.catalog.runner import (
    SHARED_STAGES,
    RunOutcome,
    check_workspace,
    finished_ids,
    remove_existing,
    run_queue,
    run_sequential,
)
from ccnf.catalog.schema import (
    CATALOG_FILE,
    ID_PATTERN,
    PARAMS_FILE,
    Catalog,
    Experiment,
    NoteFigure,
    load_catalog,
)

__all__ = [
    "CATALOG_FILE",
    "ID_PATTERN",
    "PARAMS_FILE",
    "SCORE_DEFS",
    "SHARED_STAGES",
    "STAGE_RE",
    "SUMMARY_FILE",
    "WORKER_RE",
    "Catalog",
    "ExpRecord",
    "Experiment",
    "NoteFigure",
    "QueueStatus",
    "Row",
    "RunOutcome",
    "apply_overrides",
    "check_workspace",
    "dvc",
    "dvc_env",
    "existing_names",
    "finished_ids",
    "live_workers",
    "load_catalog",
    "load_records",
    "match_records",
    "params_mismatch",
    "parse_exp_show",
    "parse_override",
    "parse_queue_status",
    "queue_status",
    "queued_names",
    "read_yaml",
    "record_baselines",
    "remove_existing",
    "run_leaving_children",
    "run_queue",
    "run_sequential",
    "schema_key_error",
    "workers_alive",
]
