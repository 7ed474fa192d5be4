"""jaxrecover: recovering Vanilla Gradients from Integrated Gradients answers, in JAX.

The public API, by layer (docs/ARCHITECTURE.md), from the ground up:

* foundation - ``ops``, ``native``, ``data``, ``metrics``, ``fileio``, ``validate``, ``checkpoint``
* models     - ``make_model(name)`` -> ``Model``: ``model(params, x_one) -> logits``, inference mode
* explainers - single-example pure functions and explainer objects: ``VG``, ``IG``, ``RULES``, patterns
* engine     - ``explain(explainer, model, params, x, target)`` runs any explainer over a batch
* search     - decision-boundary search (PGD, CW, facet) and Boundary Attribution run with it
* training   - training and loading the paper's models
* services   - the victim side: IG services, defences, BIG as a service, real peers (``services.external``)
* attacks    - query plans, ``recover``, ``attack(service, plan, x, target)``, fixed-m recovery, identification
* stealing   - model extraction and clones
* protocol   - the paper's Tables 1-4 and Figures 4-5 (``evaluate``)

This module only re-exports.
"""

from . import (attacks, checkpoint, data, engine, explainers, metrics, models, native, protocol, search, services,
               stealing, training)
from ._version import __version__
from .attacks import (Averaged, NotPiecewiseLinear, Query, QueryPlan, Recovery, RecoveryIncomplete, RecoveryReport, approx_plan, attack,
                      best_plan, exact_plan, identify_service, minimal_plan, nobias_plan, paper_plan, plan_residual,
                      query_inputs, recover, recover_eq2, recover_eq3, recover_eq4, recover_fixed_steps,
                      recover_fixed_steps_from_kinks, recover_from_big, recover_from_outputs, recover_input_baseline,
                      recover_random_steps, service_plan)
from .data import Dataset, load_dataset, normalize
from .engine import convergence_delta, explain
from .explainers import (BIG, BSG, BSM, IG, OUTPUTS, RULES, VG, BlurBaseline, Explainer, PatternAttribution,
                         PatternNet, completeness_delta, fit_patterns, fitted_patterns, integrated_gradients,
                         load_patterns, quadrature, save_patterns, vanilla_gradient)
from .metrics import (cosine_similarity, normalized_distance, relative_error, spearman, summarize,
                      top_fraction_overlap)
from .models import (MODEL_NAMES, Model, as_model, cast_variables, float_dtype, init_variables, make_model,
                     model_variables)
from .protocol import EvalConfig, ProtocolConfig, evaluate, run_protocol
from .search import BoundaryResult, InputBox, boundary_attributions, boundary_search
from .services import (AssumedBaseline, BoundaryBaseline, ClientBudget, ExpectedGradients, FixSteps, GaussianNoise,
                       IGService, LaplaceNoise, QueryBudgetExceeded, RandomSteps, RoundAnswers, ServiceAnswerError,
                       ServiceWrapper, SimulatedIGService, SmoothGradIG, StepCountRefused, TopK)
from .stealing import extract_mlp, extract_two_layer, train_clone
from .training import TrainConfig, load_trained, train_and_evaluate

__all__ = [
    "__version__",
    # modules
    "attacks", "checkpoint", "data", "engine", "explainers", "metrics", "models", "native", "protocol", "search",
    "services", "stealing", "training",
    # explainers and the engine
    "Explainer", "VG", "IG", "BlurBaseline", "RULES", "OUTPUTS", "quadrature", "vanilla_gradient", "integrated_gradients",
    "completeness_delta", "explain", "convergence_delta", "PatternNet", "PatternAttribution", "fit_patterns",
    "fitted_patterns", "save_patterns", "load_patterns", "BSM", "BIG", "BSG",
    # boundary search
    "InputBox", "BoundaryResult", "boundary_search", "boundary_attributions",
    # models
    "Model", "MODEL_NAMES", "make_model", "as_model", "model_variables", "init_variables", "cast_variables",
    "float_dtype",
    # services and defences
    "IGService", "SimulatedIGService", "ServiceWrapper", "AssumedBaseline", "QueryBudgetExceeded", "StepCountRefused",
    "ServiceAnswerError", "BoundaryBaseline", "RoundAnswers", "GaussianNoise", "LaplaceNoise", "TopK", "FixSteps",
    "RandomSteps", "ClientBudget", "SmoothGradIG", "ExpectedGradients",
    # attacks
    "Query", "QueryPlan", "exact_plan", "minimal_plan", "paper_plan", "nobias_plan", "approx_plan",
    "plan_residual", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack",
    "service_plan", "best_plan", "recover_fixed_steps", "recover_fixed_steps_from_kinks", "identify_service",
    "recover_from_outputs", "recover_input_baseline", "recover_random_steps", "recover_from_big", "Averaged",
    "NotPiecewiseLinear", "RecoveryIncomplete", "Recovery", "RecoveryReport",
    # stealing
    "extract_two_layer", "extract_mlp", "train_clone",
    # metrics
    "normalized_distance", "cosine_similarity", "relative_error", "spearman", "top_fraction_overlap", "summarize",
    # data and training
    "Dataset", "load_dataset", "normalize", "TrainConfig", "train_and_evaluate", "load_trained",
    # the paper's protocol
    "ProtocolConfig", "run_protocol", "EvalConfig", "evaluate",
]
