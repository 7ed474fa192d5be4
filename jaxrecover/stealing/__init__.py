"""Model stealing from IG answers: exact extraction of two-layer and deep fully connected ReLU nets, and clones
trained on answers."""

from .deep import (MLPExtraction, MLPExtractionIncomplete, canonical_mlp, extract_mlp, mlp_fidelity, mlp_logits,
                   mlp_params)
from .clone import CLONE_KINDS, CloneData, clone_metrics, train_clone, victim_reference
from .extraction import (Extraction, ExtractionIncomplete, canonical_two_layer, extract_two_layer,
                         extraction_fidelity, two_layer_logits, two_layer_variables)

__all__ = [
    "extract_two_layer", "Extraction", "ExtractionIncomplete", "canonical_two_layer", "two_layer_logits",
    "two_layer_variables", "extraction_fidelity", "CLONE_KINDS", "CloneData", "train_clone", "clone_metrics",
    "victim_reference", "extract_mlp", "MLPExtraction", "MLPExtractionIncomplete", "canonical_mlp", "mlp_logits",
    "mlp_fidelity", "mlp_params",
]
