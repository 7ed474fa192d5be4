"""Attacks on IG services: query plans, recovery of the Vanilla Gradient, and service objects.

Real services (Captum, PAIR saliency) live in :mod:`jaxrecover.attacks.external` and need the
``services`` extra; import them from there.
"""

from .defences import (Averaged, ClientBudget, FixSteps, GaussianNoise, LaplaceNoise, RandomSteps, RoundAnswers,
                       SmoothGradIG, TopK, ExpectedGradients, round_significant)
from .boundary import (BoundaryBaseline, BoundaryPointReport, boundary_attributions, estimate_boundary_point,
                       recover_from_big)
from .clone import CLONE_KINDS, CloneData, clone_metrics, train_clone, victim_reference
from .extraction import (Extraction, ExtractionIncomplete, canonical_two_layer, extract_two_layer, extraction_fidelity,
                         two_layer_logits, two_layer_variables)
from .fixed_steps import FixedStepsReport, recover_fixed_steps
from .kinks import KinkReport, recover_fixed_steps_from_kinks
from .lattice import LatticeReport, lattice_attack, lattice_queries
from .input_baseline import ChainReport, recover_input_baseline
from .outputs import OutputsReport, recover_from_outputs
from .random_steps import RandomStepsReport, recover_random_steps
from .identify import Identification, identify_service, infer_baseline
from .plans import (Query, QueryPlan, actual_residual, approx_plan, best_plan, exact_plan, minimal_plan, nobias_plan,
                    paper_plan, plan_measure, plan_residual, realise_plan, service_plan, telescoping_plan,
                    bitwise_shared, bitwise_plan)
from .recovery import attack, query_input, query_inputs, recover, recover_eq2, recover_eq3, recover_eq4
from .linearity import NotPiecewiseLinear, RecoveryIncomplete, check_piecewise_linear
from .services import (AssumedBaseline, IGService, QueryBudgetExceeded, ServiceAnswerError, ServiceWrapper,
                       SimulatedIGService, StepCountRefused, check_answers)

__all__ = [
    "Query", "QueryPlan", "exact_plan", "minimal_plan", "nobias_plan", "approx_plan", "paper_plan",
    "plan_residual", "plan_measure", "realise_plan", "actual_residual", "telescoping_plan", "service_plan", "bitwise_shared", "bitwise_plan",
    "best_plan", "estimate_boundary_point", "recover_from_big", "BoundaryPointReport", "boundary_attributions",
    "BoundaryBaseline", "recover_fixed_steps", "FixedStepsReport", "recover_fixed_steps_from_kinks", "KinkReport", "recover_input_baseline", "ChainReport",
    "recover_from_outputs", "OutputsReport", "recover_random_steps", "RandomStepsReport", "lattice_attack", "lattice_queries", "LatticeReport", "identify_service", "infer_baseline", "Identification",
    "query_input", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack",
    "IGService", "SimulatedIGService", "ServiceWrapper", "AssumedBaseline", "QueryBudgetExceeded", "StepCountRefused",
    "ServiceAnswerError", "check_answers", "NotPiecewiseLinear", "RecoveryIncomplete", "check_piecewise_linear",
    "RoundAnswers", "GaussianNoise", "LaplaceNoise", "TopK", "FixSteps", "RandomSteps", "ClientBudget",
    "SmoothGradIG", "ExpectedGradients", "Averaged", "round_significant",
    "extract_two_layer", "Extraction", "ExtractionIncomplete", "canonical_two_layer", "two_layer_logits",
    "two_layer_variables", "extraction_fidelity", "CLONE_KINDS", "CloneData", "train_clone", "clone_metrics", "victim_reference",
]
