"""Evaluation metrics: ranking (AUROC, AP, F1), AUPRO, and continual-learning summaries."""

from ccnf.metrics.aupro import aupro
from ccnf.metrics.continual import (
    backward_transfer,
    diagonal_average,
    final_average,
    forgetting,
    per_task_forgetting,
    step_average,
)
from ccnf.metrics.ranking import (
    auroc,
    average_precision,
    f1_max,
    precision_recall_f1_at,
    roc_curve,
)

__all__ = [
    "aupro",
    "auroc",
    "average_precision",
    "backward_transfer",
    "diagonal_average",
    "f1_max",
    "final_average",
    "forgetting",
    "per_task_forgetting",
    "precision_recall_f1_at",
    "roc_curve",
    "step_average",
]
