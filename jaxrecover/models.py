"""The paper's five MNIST models (Flax Linen) and the one pure boundary.

Models take NHWC images ``(N, 28, 28, 1)`` and return logits ``(N, 10)``.
Everything downstream of this module sees only ``logit_fn(variables, x)``:

>>> import jax, jax.numpy as jnp
>>> from jaxrecover import models
>>> model = models.get_model("twolayer")
>>> variables = models.init_variables(model, jax.random.key(0))
>>> logit_fn = models.make_logit_fn(model)              # one example
>>> logit_fn(variables, jnp.zeros((28, 28, 1), jnp.float32)).shape
(10,)

``make_logit_fn`` fixes inference mode once (BatchNorm on its running
statistics); there is no ``train()``/``eval()`` toggle anywhere downstream.
Layers are built with ``dtype=None`` so they compute in the dtype of their
parameters and inputs: cast the variables with :func:`cast_variables` and feed
inputs of the same dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import ops

__all__ = [
    "MODEL_NAMES",
    "INPUT_SHAPE",
    "NUM_CLASSES",
    "TwoLayerNet",
    "LeNet",
    "ResNet18",
    "BasicBlock",
    "get_model",
    "init_variables",
    "make_logit_fn",
    "make_batched_logit_fn",
    "StemSplit",
    "cast_variables",
    "check_float_dtype",
    "param_count",
    "tree_dtypes",
]

INPUT_SHAPE = (28, 28, 1)


def Conv(*args, **kwargs) -> nn.Conv:
    """``nn.Conv`` computing with :func:`jaxrecover.ops.conv_general_dilated` (same function, faster on CPU)."""
    return nn.Conv(*args, conv_general_dilated=ops.conv_general_dilated, **kwargs)

NUM_CLASSES = 10
Variables = Any


class TwoLayerNet(nn.Module):
    """flatten 784 -> fc 100 -> ReLU -> fc 10.

    Every model's ``__call__`` takes ``part``: ``"all"`` (the model), ``"stem"``
    (its first, affine layer only) or ``"body"`` (the rest, applied to a stem
    output). Layers are named explicitly so the three share one set of variables.
    """

    use_bias: bool = True
    hidden: int = 100
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        if part != "body":
            x = nn.Dense(self.hidden, use_bias=self.use_bias, name="Dense_0")(x.reshape(x.shape[0], -1))
            if part == "stem":
                return x
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="Dense_1")(nn.relu(x))


class LeNet(nn.Module):
    """conv3x3 32 -> ReLU -> conv3x3 64 -> ReLU -> maxpool 2 -> fc 128 -> ReLU -> fc 10."""

    use_bias: bool = True
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        if part != "body":
            x = Conv(32, (3, 3), padding="VALID", use_bias=self.use_bias, name="Conv_0")(x)
            if part == "stem":
                return x
        x = nn.relu(Conv(64, (3, 3), padding="VALID", use_bias=self.use_bias, name="Conv_1")(nn.relu(x)))
        x = ops.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, use_bias=self.use_bias, name="Dense_0")(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="Dense_1")(x)


def _bn(train: bool, name: str | None = None):
    # torch's momentum 0.1 is flax's 0.9; eps as torch.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(s)-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = ((1, 1), (1, 1))
        y = Conv(self.features, (3, 3), (self.strides,) * 2, padding=pad, use_bias=False)(x)
        y = nn.relu(_bn(train)(y))
        y = Conv(self.features, (3, 3), padding=pad, use_bias=False)(y)
        y = _bn(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), (self.strides,) * 2, use_bias=False, name="shortcut_conv")(x)
            x = _bn(train, name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """torchvision ResNet18 layout for 1-channel 28x28 input and 10 classes."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        if part != "body":
            x = Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
            x = _bn(train, name="bn1")(x)
            if part == "stem":
                return x
        x = ops.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = 0
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = BasicBlock(64 * 2**i, strides=2 if (i > 0 and j == 0) else 1, name=f"BasicBlock_{block}")(x, train)
                block += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "twolayer_nobias": lambda: TwoLayerNet(use_bias=False),
    "twolayer": lambda: TwoLayerNet(use_bias=True),
    "lenet_nobias": lambda: LeNet(use_bias=False),
    "lenet": lambda: LeNet(use_bias=True),
    "resnet18": lambda: ResNet18(),
}
MODEL_NAMES = tuple(_FACTORIES)


def get_model(name: str) -> nn.Module:
    """The Flax module of a model by name (one of :data:`MODEL_NAMES`)."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def init_variables(model: nn.Module | str, key: jax.Array, dtype=jnp.float32) -> Variables:
    """Initialise ``{'params': ..., ['batch_stats': ...]}`` in ``dtype``."""
    if isinstance(model, str):
        model = get_model(model)
    variables = model.init(key, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False)
    variables = jax.tree.map(lambda a: a, dict(variables))
    return cast_variables(variables, dtype)


def check_float_dtype(dtype) -> jnp.dtype:
    """Validate a float dtype request; float64 needs ``jax_enable_x64``."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError(
            "float64 was requested but jax_enable_x64 is off, so JAX would silently compute in float32. "
            "Enable it first: jax.config.update('jax_enable_x64', True) at start-up, "
            "the environment variable JAX_ENABLE_X64=1, or `with jax.enable_x64(True):`."
        )
    return dtype


def cast_variables(variables: Variables, dtype) -> Variables:
    """Cast every floating leaf (params and BatchNorm statistics) to ``dtype``.

    Raises:
      RuntimeError: float64 requested while ``jax_enable_x64`` is off.
    """
    dtype = check_float_dtype(dtype)

    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    out = jax.tree.map(cast, variables)
    bad = {d for d in tree_dtypes(out) if jnp.issubdtype(d, jnp.floating) and d != dtype}
    assert not bad, f"cast_variables left leaves in {bad}"
    return out


def tree_dtypes(tree) -> set:
    """The set of dtypes of a pytree's leaves."""
    return {jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(tree)}


def param_count(variables: Variables) -> int:
    """Number of trainable parameters (the ``params`` collection)."""
    return int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(variables["params"])))


def _check_input(variables, x, batched: bool):
    want = (None, *INPUT_SHAPE) if batched else INPUT_SHAPE
    shape = tuple(x.shape)
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        form = "(N, 28, 28, 1)" if batched else "(28, 28, 1)"
        raise ValueError(f"expected input of shape {form} (NHWC), got {shape}; "
                         "normalise uint8 images with jaxrecover.data.normalize")
    pdtype = jax.tree.leaves(variables["params"])[0].dtype
    if x.dtype != pdtype:
        raise TypeError(f"input dtype {x.dtype} differs from the parameters' {pdtype}; "
                        f"cast the input (x.astype({pdtype})) or the variables (cast_variables)")


def make_batched_logit_fn(model: nn.Module | str) -> Callable[[Variables, jax.Array], jax.Array]:
    """``logit_fn(variables, x[N, 28, 28, 1]) -> logits[N, 10]`` in inference mode."""
    if isinstance(model, str):
        model = get_model(model)

    def logit_fn(variables, x):
        _check_input(variables, x, batched=True)
        return model.apply(variables, x, train=False)

    return logit_fn


def make_logit_fn(model: nn.Module | str) -> Callable[[Variables, jax.Array], jax.Array]:
    """``logit_fn(variables, x[28, 28, 1]) -> logits[10]`` for ONE example, inference mode.

    Batch it with ``jax.vmap(logit_fn, in_axes=(None, 0))``.

    The function carries ``logit_fn.affine_stem``: a :class:`StemSplit` of the
    model into its first, affine layer (``stem``: Dense/Conv, ResNet18's conv1 +
    inference-mode bn1) and the rest (``body``), ``logit_fn = body o stem``.
    :func:`jaxrecover.attribution.attribute` uses it to compute the stem once
    per example instead of once per path point (an exact identity, see
    :func:`jaxrecover.attribution.integrated_gradients_affine_stem`).
    """
    if isinstance(model, str):
        model = get_model(model)

    def logit_fn(variables, x):
        _check_input(variables, x, batched=False)
        return model.apply(variables, x[None], train=False)[0]

    def stem(variables, x):
        _check_input(variables, x, batched=False)
        return model.apply(variables, x[None], train=False, part="stem")[0]

    def body(variables, h):
        return model.apply(variables, h[None], train=False, part="body")[0]

    logit_fn.affine_stem = StemSplit(stem, body)
    return logit_fn


class StemSplit(NamedTuple):
    """``logit_fn(v, x) == body(v, stem(v, x))`` for ONE example, with ``stem`` affine in ``x``."""

    stem: Callable[[Variables, jax.Array], jax.Array]
    body: Callable[[Variables, jax.Array], jax.Array]
