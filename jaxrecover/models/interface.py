"""The one model interface: :class:`Model`, a pure ``logits = model(params, x)`` for ONE example.

>>> import jax, jax.numpy as jnp
>>> from jaxrecover import models
>>> model = models.make_model("twolayer")                # inference mode, fixed once
>>> params = models.init_variables("twolayer", jax.random.key(0))
>>> model(params, jnp.zeros((28, 28, 1), jnp.float32)).shape
(10,)

Everything downstream (explainers, engine, attacks, protocol) sees only a
``Model`` or a bare function ``logit_fn(params, x_one) -> logits``
(:func:`as_model` wraps one). A ``Model`` also carries what round-2 methods
need: the affine first layer (``affine_stem``: IG computes it once per example),
the kernels of every layer and the activations of one forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..validate import float_dtype
from . import user
from .nets import HEAD, INPUT_SHAPE, LeNet, ResNet18, TwoLayerNet, get_model

__all__ = ["Model", "StemSplit", "ReluConvSplit", "make_model", "as_model", "make_batched_logit_fn", "init_variables",
           "cast_variables", "check_float_dtype", "param_count", "tree_dtypes", "float_dtype", "model_variables"]

_LIBRARY_NETS = (TwoLayerNet, LeNet, ResNet18)  # take ``part=`` (the affine stem split) and MNIST images
model_variables = user.model_variables

Variables = Any


class StemSplit(NamedTuple):
    """``model(v, x) == body(v, stem(v, x))`` for ONE example, with ``stem`` affine in ``x``."""

    stem: Callable[[Variables, jax.Array], jax.Array]
    body: Callable[[Variables, jax.Array], jax.Array]


class ReluConvSplit(NamedTuple):
    """``body(v, h) == head(v, P(conv(relu(h), kernel) + bias))`` for ONE stem output ``h``, where
    ``(kernel, bias) = conv(v)`` is a stride-1 VALID NHWC/HWIO convolution (bias None: no bias) and ``P`` is
    the identity (``pool`` 0) or ``max_pool(relu(.))`` with window = stride = ``pool`` and the first-maximum
    gradient of :func:`jaxrecover.ops.max_pool`.

    The split IG's sparse path needs (:func:`jaxrecover.explainers.integrated_gradients_relu_conv`)."""

    conv: Callable[[Variables], tuple[jax.Array, jax.Array | None]]
    head: Callable[[Variables, jax.Array], jax.Array]
    pool: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as pure functions of ``(params, one example)``, in inference mode.

    Hashable by identity, so it can be a static ``jax.jit`` argument: build it
    once (:func:`make_model` caches one per name) and reuse it, or every new
    object compiles anew.

    Attributes:
      logit_fn: ``(params, x[*input_shape]) -> logits[C]``.
      name: the model's name.
      affine_stem: the split into an affine first layer and the rest, or None.
      relu_conv: the split of ``affine_stem.body`` into ReLU -> convolution -> the rest (LeNet), or None.
      module: the Flax module behind it (None for a plain function); needed by
        :meth:`kernels` and :meth:`activations`.
      input_shape: the shape of one example, or None when unknown.
      batch_fn: ``(params, x[B, *input_shape]) -> logits[B, C]`` in one call (a Flax module's own batched
        apply), or None (:meth:`batched` then maps ``logit_fn``).
      graph: an NNX model's ``variables -> module`` (a fresh copy in eval mode; None otherwise).
    """

    logit_fn: Callable[[Variables, jax.Array], jax.Array]
    name: str = "custom"
    affine_stem: StemSplit | None = None
    relu_conv: ReluConvSplit | None = None
    module: nn.Module | None = None
    input_shape: tuple[int, ...] | None = None
    batch_fn: Callable[[Variables, jax.Array], jax.Array] | None = None
    graph: Callable[[Variables], Any] | None = None

    def __call__(self, params: Variables, x: jax.Array) -> jax.Array:
        return self.logit_fn(params, x)

    def batched(self, params: Variables, x: jax.Array) -> jax.Array:
        """Logits ``[B, C]`` of a batch ``x [B, *input_shape]``: the Flax module applied once to the whole batch
        (one batched convolution; XLA:CPU runs B per-example ones, and their weight gradients, far slower),
        or ``jax.vmap`` of ``logit_fn`` for a plain function. Examples stay independent (inference mode)."""
        if self.batch_fn is not None:
            return self.batch_fn(params, x)
        return jax.vmap(self.logit_fn, in_axes=(None, 0))(params, x)

    def _need_module(self, what: str) -> nn.Module:
        if self.module is None:
            raise NotImplementedError(f"{what} needs a Flax Linen model (as_model(linen_module)); {self.name!r} is "
                                      "a plain function or an NNX module")
        return self.module

    def kernels(self, params: Variables) -> dict[str, jax.Array]:
        """Every layer's kernel by layer path (``"Conv_0"``, ``"BasicBlock_0/Conv_0"``, ...)."""
        if self.graph is None:
            self._need_module("kernels()")
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
            keys = [str(getattr(k, "key", k)) for k in path]
            if keys[-1] == "kernel":
                out["/".join(keys[:-1])] = leaf
        return out

    def activations(self, params: Variables, x: jax.Array) -> dict[str, jax.Array]:
        """The output of every layer for ONE example ``x``, by layer path (inference mode).

        Layer outputs are pre-activation (a Dense/Conv output includes its bias;
        ReLU is not a layer). ``"logits"`` is the model's output.
        """
        module = self._need_module("activations()")
        if self.input_shape == INPUT_SHAPE and isinstance(module, _LIBRARY_NETS):
            _check_input(params, x, batched=False)
        logits, state = module.apply(params, x[None], **user.linen_kwargs(module), capture_intermediates=True,
                                     mutable=["intermediates"])
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
            keys = [k.key for k in path if hasattr(k, "key") and k.key != "__call__"]
            if keys:  # the top-level module's own output is "logits" below
                out["/".join(keys)] = leaf[0]
        out["logits"] = logits[0]
        return out


def _check_input(variables, x, batched: bool):
    want = (None, *INPUT_SHAPE) if batched else INPUT_SHAPE
    shape = tuple(x.shape)
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        form = "(N, 28, 28, 1)" if batched else "(28, 28, 1)"
        raise ValueError(f"expected input of shape {form} (NHWC), got {shape}; "
                         "normalise uint8 images with jaxrecover.data.normalize")
    pdtype = float_dtype(variables["params"])
    if x.dtype != pdtype:
        raise TypeError(f"input dtype {x.dtype} differs from the parameters' {pdtype}; "
                        f"cast the input (x.astype({pdtype})) or the variables (cast_variables)")


@functools.lru_cache(maxsize=None)
def _model_by_name(name: str) -> Model:
    return _build(get_model(name), name)


def _build(module: nn.Module, name: str) -> Model:
    def logit_fn(variables, x):
        _check_input(variables, x, batched=False)
        return module.apply(variables, x[None], train=False)[0]

    def stem(variables, x):
        _check_input(variables, x, batched=False)
        return module.apply(variables, x[None], train=False, part="stem")[0]

    def body(variables, h):
        return module.apply(variables, h[None], train=False, part="body")[0]

    relu_conv = None
    if isinstance(module, LeNet):
        def conv(variables):
            layer = variables["params"]["Conv_1"]
            return layer["kernel"], layer.get("bias")

        def head(variables, u):
            return module.apply(variables, u[None], train=False, part=HEAD)[0]

        relu_conv = ReluConvSplit(conv, head, pool=2)
    def batch_fn(variables, x):
        return module.apply(variables, x, train=False)

    return Model(logit_fn, name=name, affine_stem=StemSplit(stem, body), relu_conv=relu_conv, module=module,
                 input_shape=INPUT_SHAPE, batch_fn=batch_fn)


def make_model(model, example=None) -> Model:
    """The :class:`Model` of a built-in model (by name, cached: the same object each time) or of a Flax module
    (Linen or NNX; see :func:`as_model`).

    Inference mode is fixed here (BatchNorm on its running statistics); there
    is no ``train()``/``eval()`` toggle anywhere downstream.
    """
    if isinstance(model, str):
        return _model_by_name(model)
    if isinstance(model, _LIBRARY_NETS):
        return _build(model, type(model).__name__)
    if isinstance(model, nn.Module):
        return user.linen_model(model, user.example_shape(example))
    if user.is_nnx(model):
        return user.nnx_model(model, user.example_shape(example))
    raise TypeError(f"make_model takes a model name or a Flax (Linen or NNX) module, got {type(model).__name__}")


_WRAPPED: "weakref.WeakKeyDictionary[Any, Model]" = weakref.WeakKeyDictionary()


def as_model(model, example=None) -> Model:
    """Anything this library can explain, as a :class:`Model` (built once per object and reused, so jitted
    functions compile once):

    * a :class:`Model`: itself; a name (``"lenet"``): :func:`make_model`;
    * a Flax Linen module whose ``__call__(x[B, ...])`` returns logits ``[B, C]`` (``train=False`` is passed
      when it takes ``train``); variables from ``module.init`` or :func:`init_variables`;
    * a Flax NNX module (same call convention), in eval mode; variables from :func:`model_variables`;
    * a plain function ``logit_fn(params, x_one) -> logits[C]`` of ONE example.

    ``example``: one input example (or its shape), so that inputs of another shape get a clear error; optional.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, str):
        return _model_by_name(model)
    if not callable(model) and not user.is_nnx(model):
        raise TypeError(f"expected a jaxrecover Model, a Flax Linen or NNX module, or a function logit_fn(params, x), "
                        f"got {type(model).__name__}")
    if example is None:  # an example shape makes a different Model: not cached
        try:
            return _WRAPPED[model]
        except (KeyError, TypeError):
            pass
    if isinstance(model, nn.Module) or user.is_nnx(model):
        wrapped = make_model(model, example)
    else:
        wrapped = Model(model, name=getattr(model, "__name__", "custom"), input_shape=user.example_shape(example))
    try:
        if example is None:
            _WRAPPED[model] = wrapped
    except TypeError:  # not weak-referenceable: no caching (compiles per wrapper)
        pass
    return wrapped


def make_batched_logit_fn(model: nn.Module | str) -> Callable[[Variables, jax.Array], jax.Array]:
    """``logit_fn(variables, x[N, 28, 28, 1]) -> logits[N, 10]`` in inference mode (training and accuracy)."""
    if isinstance(model, str):
        model = get_model(model)

    def logit_fn(variables, x):
        _check_input(variables, x, batched=True)
        return model.apply(variables, x, train=False)

    return logit_fn


def init_variables(model, key: jax.Array, dtype=jnp.float32, *, biases: str = "zeros", example=None
                   ) -> Variables:
    """Initialise ``{'params': ..., ['batch_stats': ...]}`` in ``dtype``.

    ``model``: a built-in model's name or module, a user's Linen module (initialised on ``example``, one input
    or its shape; default an MNIST image ``(28, 28, 1)``), or an NNX module (its own weights, drawn when it was
    built: ``key`` is not used; see :func:`model_variables`).

    ``biases``: ``"zeros"`` (Flax's default: a bias-free ReLU net is positively homogeneous, so every IG path
    point has the same gradient) or ``"torch"``: every Conv/Dense bias drawn like PyTorch's default,
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` from the layer's kernel (BatchNorm untouched), so
    ReLUs switch along IG's path as in trained nets (what benchmarks of IG should time).
    """
    if biases not in ("zeros", "torch"):
        raise ValueError(f"biases must be 'zeros' or 'torch', got {biases!r}")
    if isinstance(model, str):
        model = get_model(model)
    if user.is_nnx(model):
        if biases != "zeros":
            raise ValueError("biases='torch' redraws a Linen model's biases; an NNX module brings its own weights")
        return cast_variables(user.model_variables(model), dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_variables takes a model name or a Flax module, got {type(model).__name__}; a plain "
                        "function brings its own params")
    if isinstance(model, _LIBRARY_NETS):
        variables = dict(model.init(key, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False))
    else:
        variables = user.init_linen(model, key, user.example_shape(example) or INPUT_SHAPE)
    if biases == "torch":
        layers = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
        kernels = {tuple(map(str, path[:-1])): leaf for path, leaf in layers if getattr(path[-1], "key", "") == "kernel"}
        keys = iter(jax.random.split(jax.random.fold_in(key, 1), len(layers)))

        def draw(path, leaf):
            kernel = kernels.get(tuple(map(str, path[:-1])))
            if getattr(path[-1], "key", "") != "bias" or kernel is None:
                return leaf
            bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
            return jax.random.uniform(next(keys), leaf.shape, leaf.dtype, -bound, bound)

        variables["params"] = jax.tree_util.tree_map_with_path(draw, variables["params"])
    return cast_variables(variables, dtype)


def check_float_dtype(dtype) -> jnp.dtype:
    """Validate a float dtype request; float64 needs ``jax_enable_x64``."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
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
    if bad:
        raise AssertionError(f"cast_variables left leaves in {bad}")
    return out


def tree_dtypes(tree) -> set:
    """The set of dtypes of a pytree's leaves."""
    return {jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(tree)}


def param_count(variables: Variables) -> int:
    """Number of trainable parameters (the ``params`` collection)."""
    return int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(variables["params"])))
