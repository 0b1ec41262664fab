"""gblr: learned generalized block low-rank (Gaudi-GBLR) weights for PyTorch."""

from . import structures
from .calibration import InputStats
from .config import GBLRConfig
from .conv import FrozenGBLRConv2d, GBLRConv2d
from .convert import ConversionReport, convert_
from .explain import explain
from .decompose import decompose, relative_error, svd_decompose, svd_error_curve
from .flops import FlopsReport, LayerFlops, flops_report
from .learning import SigmaSchedule, StructureLearner, param_groups
from .frozen import FrozenGBLRLinear, freeze_
from .linear import GBLRLinear
from .masks import gaudi_mask
from .pretrained import load_pretrained, save_pretrained
from .recipes.distill import distill

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "GBLRConfig",
    "convert_",
    "load_pretrained",
    "save_pretrained",
    "FlopsReport",
    "InputStats",
    "decompose",
    "explain",
    "distill",
    "relative_error",
    "svd_decompose",
    "svd_error_curve",
    "FrozenGBLRConv2d",
    "FrozenGBLRLinear",
    "GBLRConv2d",
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
