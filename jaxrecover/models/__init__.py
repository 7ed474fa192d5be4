"""The paper's models (Flax), your own (Linen, NNX, a function: :func:`as_model`) and the one interface
everything else sees (:class:`Model`)."""

from .interface import (Model, ReluConvSplit, StemSplit, as_model, cast_variables, check_float_dtype, init_variables,
                        make_batched_logit_fn, make_model, model_variables, param_count, tree_dtypes, float_dtype)
from .nets import (EXTRA_MODEL_NAMES, INPUT_SHAPE, MLP, MODEL_NAMES, NUM_CLASSES, PARTS, BasicBlock, LeNet, ResNet18,
                   TwoLayerNet, get_model)

__all__ = [
    "Model", "StemSplit", "ReluConvSplit", "make_model", "as_model", "make_batched_logit_fn", "init_variables",
    "cast_variables", "check_float_dtype", "param_count", "tree_dtypes", "float_dtype", "model_variables",
    "MODEL_NAMES", "EXTRA_MODEL_NAMES", "MLP", "INPUT_SHAPE", "NUM_CLASSES", "PARTS", "TwoLayerNet", "LeNet", "ResNet18", "BasicBlock",
    "get_model",
]
