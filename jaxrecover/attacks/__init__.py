"""The attacker's side: query plans, recovery of the Vanilla Gradient from IG answers, service identification,
and the adaptive attacks on defended services.

The services attacked live in :mod:`jaxrecover.services` (and the real peers in
:mod:`jaxrecover.services.external`); model stealing in :mod:`jaxrecover.stealing`.
"""

from .averaged import Averaged
from .big import BoundaryPointReport, estimate_boundary_point, recover_from_big
from .echoes import EchoReport, recover_fixed_steps_lsq
from .fixed_steps import FixedStepsReport, recover_fixed_steps
from .identify import Identification, identify_service, infer_baseline
from .input_baseline import ChainReport, recover_input_baseline
from .kinks import KinkAudit, KinkReport, audit_kinks, recover_fixed_steps_from_kinks
from .lattice import LatticeReport, lattice_attack, lattice_queries
from .linearity import NotPiecewiseLinear, RecoveryIncomplete, check_piecewise_linear
from .outputs import OutputsReport, output_values, recover_from_outputs
from .plans import (Query, QueryPlan, actual_residual, approx_plan, best_plan, bitwise_plan, bitwise_shared,
                    exact_plan, minimal_plan, nobias_plan, paper_plan, plan_measure, plan_residual, realise_plan,
                    service_plan, telescoping_plan)
from .random_steps import RandomStepsReport, recover_random_steps
from .result import PlanReport, Recovery, RecoveryReport, as_recovery
from .recovery import attack, query_input, query_inputs, recover, recover_eq2, recover_eq3, recover_eq4

__all__ = [
    "Query", "QueryPlan", "exact_plan", "minimal_plan", "nobias_plan", "approx_plan", "paper_plan",
    "plan_residual", "plan_measure", "realise_plan", "actual_residual", "telescoping_plan", "service_plan",
    "bitwise_shared", "bitwise_plan", "best_plan",
    "query_input", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack",
    "recover_fixed_steps", "FixedStepsReport", "recover_fixed_steps_lsq", "EchoReport", "recover_fixed_steps_from_kinks", "KinkReport", "audit_kinks", "KinkAudit",
    "NotPiecewiseLinear", "RecoveryIncomplete", "check_piecewise_linear",
    "recover_input_baseline", "ChainReport", "recover_from_outputs", "OutputsReport", "output_values",
    "recover_random_steps", "RandomStepsReport", "lattice_attack", "lattice_queries", "LatticeReport",
    "identify_service", "infer_baseline", "Identification", "Averaged",
    "estimate_boundary_point", "recover_from_big", "BoundaryPointReport",
    "Recovery", "RecoveryReport", "PlanReport", "as_recovery",
]
