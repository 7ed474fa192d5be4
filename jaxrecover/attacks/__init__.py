"""Attacks on IG services: query plans, recovery of the Vanilla Gradient, and service objects."""

from .plans import (Query, QueryPlan, approx_plan, exact_plan, minimal_plan, nobias_plan, paper_plan, plan_measure,
                    plan_residual)
from .recovery import attack, query_input, query_inputs, recover, recover_eq2, recover_eq3, recover_eq4
from .services import IGService, QueryBudgetExceeded, ServiceWrapper, SimulatedIGService, StepCountRefused

__all__ = [
    "Query", "QueryPlan", "exact_plan", "minimal_plan", "nobias_plan", "approx_plan", "paper_plan",
    "plan_residual", "plan_measure",
    "query_input", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack",
    "IGService", "SimulatedIGService", "ServiceWrapper", "QueryBudgetExceeded", "StepCountRefused",
]
