"""The paper's protocol: Tables 1-4, Figures 4-5, the BatchNorm ablation, reports and figures."""

from .ablation import batchstats_protocol_chunk, make_batchstats_logit_fn
from .evaluation import EvalConfig, evaluate
from .experiments import (EXPERIMENTS, PAPER, RULE, ProtocolConfig, experiments_for, explain_examples,
                          path_gradient_norms, protocol_chunk, protocol_one, run_protocol)
from .report import load_results, markdown_report

__all__ = [
    "EXPERIMENTS", "PAPER", "RULE", "ProtocolConfig", "experiments_for", "protocol_one", "protocol_chunk",
    "run_protocol", "path_gradient_norms", "explain_examples",
    "make_batchstats_logit_fn", "batchstats_protocol_chunk",
    "EvalConfig", "evaluate", "load_results", "markdown_report",
]
