"""Normalizing-flow building blocks and the CCNF model.

Shared primitives (one concept per module, used by CCNF and the per-class baselines):
:mod:`~ccnf.flows.gaussian` (standard-normal base density), :mod:`~ccnf.flows.log_scale`
(soft clamp and warm-up of a coupling's log-scale), :mod:`~ccnf.flows.affine` (the affine
coupling transform), :mod:`~ccnf.flows.permutation` (fixed permutations between couplings),
:mod:`~ccnf.flows.mean_condition` (the class's mean content as a condition).
"""

from ccnf.flows.ccnf import CCNF, LevelOutput
from ccnf.flows.coupling import ConditionalAffineCoupling
from ccnf.flows.flow import ConditionalFlow
from ccnf.flows.positional import positional_encoding_2d
from ccnf.flows.spectral import SNLinear

__all__ = [
    "CCNF",
    "ConditionalAffineCoupling",
    "ConditionalFlow",
    "LevelOutput",
    "SNLinear",
    "positional_encoding_2d",
]
