"""gblr: learned generalized block low-rank (Gaudi-GBLR) weights for PyTorch."""

from . import structures
from .flops import FlopsReport, LayerFlops, flops_report
from .learning import SigmaSchedule, StructureLearner, param_groups
from .linear import FrozenGBLRLinear, GBLRLinear, freeze_
from .masks import gaudi_mask

__version__ = "0.1.0"

__all__ = [
    "FlopsReport",
    "FrozenGBLRLinear",
    "GBLRLinear",
    "LayerFlops",
    "flops_report",
    "freeze_",
    "gaudi_mask",
    "param_groups",
    "SigmaSchedule",
    "StructureLearner",
    "structures",
]
