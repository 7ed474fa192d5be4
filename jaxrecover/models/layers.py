"""A model's kernel layers (Dense and 2-D Conv, Flax Linen or NNX): their list in call order, and a forward run
with a hook on every one of them (what PatternNet needs: each layer's input and output, and a backward pass with
the kernel replaced).

Linen has ``nn.intercept_methods``; NNX has no interception, so a run merges a fresh copy of the module from
its variables and gives each kernel layer of that copy a subclass whose ``__call__`` calls the hook (the
user's module is never touched). Both give the hook the same :class:`Layer` description and the layer's
input and output; :func:`linear` applies a layer's linear part (no bias) with any kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Layer", "kernel_layers", "run_with_hook", "linear", "patches", "has_layers"]

_DIMS = ("NHWC", "HWIO", "NHWC")


class Layer(NamedTuple):
    """One kernel layer: ``path`` (``"Conv_0"``, ``"layers/1"``: its kernel is ``params/<path>/kernel``),
    ``kind`` (``"dense"`` or ``"conv"``) and, for a convolution, its window, strides and padding."""

    path: str
    kind: str
    kernel_size: tuple = ()
    strides: tuple = ()
    padding: Any = None


def _conv_layer(path: str, m) -> Layer:
    if len(tuple(m.kernel_size)) != 2:
        raise ValueError(f"layer {path}: only 2-D convolutions (NHWC) are supported, kernel_size {m.kernel_size}")
    for attr in ("input_dilation", "kernel_dilation", "feature_group_count"):
        value = getattr(m, attr, 1)
        if value not in (None, 1, (1, 1)):
            raise ValueError(f"layer {path}: {attr}={value} is not supported (dilated and grouped convolutions)")
    strides = m.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    padding = m.padding
    if not (isinstance(padding, str) and padding in ("SAME", "VALID")) and not (
            isinstance(padding, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding)):
        raise ValueError(f"layer {path}: padding {padding!r} is not supported ('SAME', 'VALID' or ((lo, hi), ...))")
    return Layer(path, "conv", tuple(m.kernel_size), strides, padding if isinstance(padding, str) else
                 tuple(map(tuple, padding)))


def _describe(path: str, m) -> Layer | None:
    if isinstance(m, (nn.Conv, nnx.Conv)):
        return _conv_layer(path, m)
    if isinstance(m, (nn.Dense, nnx.Linear)):
        return Layer(path, "dense")
    return None


def has_layers(model) -> bool:
    """Whether :func:`run_with_hook` can see ``model``'s layers (a Flax Linen or NNX model)."""
    return model.module is not None or model.graph is not None


def run_with_hook(model, params, x, hook: Callable[[Layer, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """``model.batched(params, x)`` with every kernel layer's output replaced by ``hook(layer, input, output)``."""
    if model.module is not None:
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return out
            layer = _describe("/".join(context.module.path), context.module)
            return out if layer is None else hook(layer, args[0], out)

        with nn.intercept_methods(interceptor):
            return model.batched(params, x)
    if model.graph is None:
        raise NotImplementedError(f"{model.name!r} is a plain function: its layers are not visible; pass a Flax "
                                  "Linen or NNX module (jaxrecover.as_model)")
    module = model.graph(params)  # a fresh copy, merged from ``params``
    for path, sub in list(nnx.iter_modules(module)):
        layer = _describe("/".join(map(str, path)), sub)
        if layer is not None:
            sub.__class__ = _tapped(type(sub))
            object.__setattr__(sub, "_jaxrecover_tap", (layer, hook))
    return module(x)


_TAPPED: dict = {}


def _tapped(cls):
    if cls not in _TAPPED:
        def __call__(self, x, *args, **kwargs):
            layer, hook = self._jaxrecover_tap
            return hook(layer, x, cls.__call__(self, x, *args, **kwargs))

        _TAPPED[cls] = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__})
    return _TAPPED[cls]


def kernel_layers(model, params, input_shape) -> dict[str, Layer]:
    """``{path: Layer}`` of the kernel layers in call order (one abstract run on a zero example)."""
    from .interface import float_dtype

    seen = {}

    def hook(layer, x, out):
        seen.setdefault(layer.path, layer)
        return out

    x = jnp.zeros((1, *input_shape), float_dtype(params))
    jax.eval_shape(lambda p, z: run_with_hook(model, p, z, hook), params, x)
    return seen


def linear(layer: Layer, kernel, x):
    """The layer's linear map (no bias) with ``kernel`` applied to ``x`` (a batch)."""
    if layer.kind == "conv":
        return jax.lax.conv_general_dilated(x, kernel, layer.strides, layer.padding, dimension_numbers=_DIMS)
    return x @ kernel


def patches(layer: Layer, x):
    """Rows of inputs one output unit sees: a Dense input as is, a Conv input as patches ``[n * positions, d]``
    (features ordered ``(C, kh, kw)``)."""
    if layer.kind == "conv":
        p = jax.lax.conv_general_dilated_patches(x, layer.kernel_size, layer.strides, layer.padding,
                                                 dimension_numbers=_DIMS)
        return p.reshape(-1, p.shape[-1])
    return x.reshape(-1, x.shape[-1])
