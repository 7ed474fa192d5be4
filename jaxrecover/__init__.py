"""jaxrecover: recovering Vanilla Gradients from Integrated Gradients answers, in JAX.

The public API, by layer (docs/ARCHITECTURE.md):

* explainers - single-example pure functions and explainer objects: ``VG``, ``IG``, ``RULES``, ...
* engine     - ``explain(explainer, model, params, x, target)`` runs any explainer over a batch
* models     - ``make_model(name)`` -> ``Model``: ``model(params, x_one) -> logits``, inference mode
* attacks    - query plans, ``recover``, ``attack(service, plan, x, target)``, IG service objects
* protocol   - the paper's Tables 1-4 and Figures 4-5 (``evaluate``)
* data, training, checkpoint, metrics - the foundation
* native     - the compiled sparse-path kernels of LeNet's IG on the CPU (``native.status()``)
"""

__version__ = "0.2.0"

from . import (adversarial, attacks, checkpoint, data, engine, explainers, metrics, models, native,  # noqa: E402
               protocol, training)
from .adversarial import BoundaryResult, InputBox, boundary_search  # noqa: E402
from .pattern_store import fitted_patterns, load_patterns, save_patterns  # noqa: E402
from .attacks import (AssumedBaseline, IGService, Query, QueryBudgetExceeded, QueryPlan, ServiceWrapper,  # noqa: E402
                      SimulatedIGService, StepCountRefused, approx_plan, attack, best_plan, exact_plan,
                      identify_service, minimal_plan, nobias_plan, paper_plan, plan_residual, query_inputs, recover,
                      recover_eq2, recover_eq3, recover_eq4, recover_fixed_steps, recover_fixed_steps_from_kinks,
                      recover_from_outputs,
                      recover_input_baseline, recover_random_steps, service_plan, extract_two_layer,
                      boundary_attributions, BoundaryBaseline, recover_from_big, NotPiecewiseLinear,
                      RecoveryIncomplete, ServiceAnswerError)
from .data import Dataset, load_dataset, normalize  # noqa: E402
from .engine import convergence_delta, explain  # noqa: E402
from .explainers import (IG, OUTPUTS, RULES, VG, BlurBaseline, Explainer, completeness_delta, integrated_gradients,  # noqa: E402
                         quadrature, vanilla_gradient, PatternNet, PatternAttribution, fit_patterns, BSM, BIG, BSG)
from .metrics import (cosine_similarity, normalized_distance, relative_error, spearman, summarize,  # noqa: E402
                      top_fraction_overlap)
from .models import MODEL_NAMES, Model, cast_variables, init_variables, make_model  # noqa: E402
from .protocol import EvalConfig, ProtocolConfig, evaluate, run_protocol  # noqa: E402
from .training import TrainConfig, load_trained, train_and_evaluate  # noqa: E402

__all__ = [
    "__version__",
    # modules
    "adversarial", "attacks", "checkpoint", "data", "engine", "explainers", "metrics", "models", "native", "protocol",
    "training",
    # explainers and the engine
    "Explainer", "VG", "IG", "BlurBaseline", "RULES", "OUTPUTS", "quadrature", "vanilla_gradient", "integrated_gradients",
    "completeness_delta", "explain", "convergence_delta", "PatternNet", "PatternAttribution", "fit_patterns",
    "fitted_patterns", "save_patterns", "load_patterns",
    "BSM", "BIG", "BSG", "InputBox", "BoundaryResult", "boundary_search", "boundary_attributions",
    # models
    "Model", "MODEL_NAMES", "make_model", "init_variables", "cast_variables",
    # attacks
    "Query", "QueryPlan", "exact_plan", "minimal_plan", "paper_plan", "nobias_plan", "approx_plan",
    "plan_residual", "query_inputs", "recover", "recover_eq2", "recover_eq3", "recover_eq4", "attack",
    "IGService", "SimulatedIGService", "ServiceWrapper", "AssumedBaseline", "QueryBudgetExceeded", "StepCountRefused",
    "service_plan", "best_plan", "recover_fixed_steps", "recover_fixed_steps_from_kinks", "identify_service", "recover_from_outputs",
    "recover_input_baseline", "recover_random_steps", "extract_two_layer", "BoundaryBaseline", "recover_from_big",
    "NotPiecewiseLinear", "RecoveryIncomplete", "ServiceAnswerError",
    # metrics
    "normalized_distance", "cosine_similarity", "relative_error", "spearman", "top_fraction_overlap", "summarize",
    # data and training
    "Dataset", "load_dataset", "normalize", "TrainConfig", "train_and_evaluate", "load_trained",
    # the paper's protocol
    "ProtocolConfig", "run_protocol", "EvalConfig", "evaluate",
]
