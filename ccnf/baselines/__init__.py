"""Per-class baselines that share CCNF's stages and metrics (issue 4).

``model.kind``: gaussian (PaDiM-like floor), flow_bank (CFlow-style flow per class), fastflow
(2-D convolutional flow per class). Each is a :class:`PerClassModel` kept in a
:class:`ClassBank`, which grows by one model per learned class and never touches earlier ones.
"""

from ccnf.baselines.bank import (
    BANK_KINDS,
    ClassBank,
    build_model,
    nbytes,
)
from ccnf.baselines.base import PerClassModel
from ccnf.baselines.fastflow import ConvAffineCoupling, FastFlow2d, FastFlowModel
from ccnf.baselines.flow_bank import FlowBankModel
from ccnf.baselines.gaussian import GaussianModel
from ccnf.baselines.maps import bank_patch_scores

__all__ = [
    "BANK_KINDS",
    "ClassBank",
    "ConvAffineCoupling",
    "FastFlow2d",
    "FastFlowModel",
    "FlowBankModel",
    "GaussianModel",
    "PerClassModel",
    "bank_patch_scores",
    "build_model",
    "nbytes",
]
