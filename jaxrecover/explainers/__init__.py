"""Explainers: single-example pure functions and the objects the batch engine runs."""

from .baselines import BlurBaseline, RandomBaseline, is_input_dependent
from .boundary import BIG, BSG, BSM
from .gradients import (OUTPUTS, completeness_delta, integrate, integrated_gradients,
                        integrated_gradients_affine_stem,
                        integrated_gradients_relu_conv, path_gradients, path_points, select_output,
                        vanilla_gradient)
from .methods import IG, VG, Explainer, explainer_dataclass
from .pattern_store import PATTERN_METADATA, fitted_patterns, load_patterns, save_patterns
from .patterns import (ESTIMATORS, LayerStats, PatternAttribution, PatternNet, fit_patterns, kernel_from_pattern,
                       kernel_layers, layer_stats, patterns_from_stats, signal_quality)
from .quadrature import RULES, QuadratureRule, get_rule, num_evaluations, quadrature

__all__ = [
    "RULES", "QuadratureRule", "get_rule", "quadrature", "num_evaluations",
    "OUTPUTS", "select_output", "vanilla_gradient", "path_points", "path_gradients", "integrate",
    "integrated_gradients", "integrated_gradients_affine_stem", "integrated_gradients_relu_conv",
    "completeness_delta",
    "Explainer", "VG", "IG", "explainer_dataclass", "BlurBaseline", "RandomBaseline", "is_input_dependent",
    "ESTIMATORS", "LayerStats", "layer_stats", "patterns_from_stats", "fit_patterns", "kernel_layers", "PatternNet",
    "PatternAttribution", "signal_quality", "kernel_from_pattern",
    "BSM", "BIG", "BSG", "fitted_patterns", "save_patterns", "load_patterns", "PATTERN_METADATA",
]
