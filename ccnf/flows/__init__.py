"""Normalizing-flow building blocks and the CCNF model."""

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
