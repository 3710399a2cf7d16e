"""The study's models behind one contract (:class:`AnomalyModel`) and a registry by
``model.kind`` (:mod:`ccnf.models.registry`).

* :mod:`ccnf.models.base`: the contract, the task inputs, the versioned checkpoint;
* :mod:`ccnf.models.ccnf`: CCNF's training glue (the torch modules live in :mod:`ccnf.flows`);
* :mod:`ccnf.models.ccnf_scores`: CCNF's patch scores and class-selection statistics;
* :mod:`ccnf.models.bank`: the per-class baselines (gaussian, flow_bank, fastflow; the torch
  modules live in :mod:`ccnf.baselines`).
"""

from ccnf.models.base import CHECKPOINT_FORMAT, AnomalyModel, TaskInputs, read_checkpoint
from ccnf.models.registry import (
    MODELS,
    check_params,
    create_model,
    model_class,
    restore_model,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODELS",
    "AnomalyModel",
    "TaskInputs",
    "check_params",
    "create_model",
    "model_class",
    "read_checkpoint",
    "restore_model",
]
