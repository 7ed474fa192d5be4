"""Your own model as a :class:`jaxrecover.models.Model`: a Flax Linen module of any input shape, a Flax NNX
module, or a plain function (the adaptors behind :func:`jaxrecover.models.as_model`).

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxrecover as jr
>>> class MLP(nnx.Module):
...     def __init__(self, rngs):
...         self.hidden, self.out = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)
...     def __call__(self, x):                      # a batch [B, 16] -> logits [B, 3]
...         return self.out(jax.nn.relu(self.hidden(x)))
>>> net = MLP(nnx.Rngs(0))
>>> model, params = jr.as_model(net), jr.model_variables(net)
>>> model(params, jnp.ones(16)).shape             # ONE example in, its logits out
(3,)

Every model here is called on ONE example; the adaptors add and remove the batch axis the module expects, fix
inference mode once (Linen: ``train=False`` when ``__call__`` takes ``train``; NNX: ``module.eval()``, so
BatchNorm uses its running statistics and Dropout is off), and keep a batched call for the engine's whole-batch
paths (:meth:`Model.batched`).

NNX: the module's graph is split once (``nnx.split``) and merged back inside every call, so the state is an
explicit argument, as JAX transformations need. ``model_variables(module)`` gives that state as plain nested
dicts of arrays: ``{"params": <nnx.Param leaves>}`` plus ``"batch_stats"`` (nnx.BatchStat) when there are any;
other state (RNG streams, counters) stays with the graph, unused in inference mode. Flax has no helper that
turns an NNX module into a pure ``f(params, x)`` of plain dicts, hence this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["is_nnx", "linen_model", "nnx_model", "model_variables", "init_linen", "example_shape"]

Variables = Any


def is_nnx(obj) -> bool:
    """Whether ``obj`` is a Flax NNX module (an instance, not the class)."""
    return isinstance(obj, nnx.Module)


def example_shape(example) -> tuple[int, ...] | None:
    """The shape of ONE example from an example array or a shape tuple (None stays None)."""
    if example is None:
        return None
    if isinstance(example, (tuple, list)) and all(isinstance(d, int) for d in example):
        return tuple(example)
    shape = tuple(jnp.shape(example))
    if not shape:
        raise ValueError("example must be one input example (an array of its shape) or its shape, got a scalar")
    return shape


def _takes(module, name: str) -> bool:
    try:
        return name in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False


def linen_kwargs(module: nn.Module) -> dict:
    """The keyword that puts a Linen module in inference mode: ``train=False`` where ``__call__`` takes it."""
    return {"train": False} if _takes(module, "train") else {}


def _one(name: str, batch_fn: Callable, input_shape) -> Callable:
    def logit_fn(variables, x):
        if input_shape is not None and tuple(x.shape) != tuple(input_shape):
            raise ValueError(f"{name} takes ONE example of shape {tuple(input_shape)}, got {tuple(x.shape)}; "
                             "explain a batch with jaxrecover.explain(explainer, model, params, x[N, ...], targets)")
        return batch_fn(variables, x[None])[0]

    return logit_fn


def linen_model(module: nn.Module, input_shape=None):
    """A Linen module whose ``__call__(x[B, ...])`` returns logits ``[B, C]`` (``train`` passed as False when it
    takes one): ``Model(logit_fn, batch_fn, module=module)``; patterns and activations work on it."""
    from .interface import Model

    kwargs = linen_kwargs(module)

    def batch_fn(variables, x):
        return module.apply(variables, x, **kwargs)

    name = type(module).__name__
    return Model(_one(name, batch_fn, input_shape), name=name, module=module, input_shape=input_shape,
                 batch_fn=batch_fn)


def init_linen(module: nn.Module, key: jax.Array, input_shape) -> Variables:
    """``module.init`` on a zero batch of one example of ``input_shape`` (float32, inference mode)."""
    return dict(module.init(key, jnp.zeros((1, *input_shape), jnp.float32), **linen_kwargs(module)))


def _split(module: nnx.Module):
    """``(graphdef, params, batch_stats, rest)`` of a copy of ``module`` in eval mode (the user's is untouched)."""
    copy = nnx.clone(module)
    copy.eval()
    return nnx.split(copy, nnx.Param, nnx.BatchStat, ...)


def model_variables(module) -> Variables:
    """An NNX module's state as the variables a :class:`Model` takes: ``{"params": ..., ["batch_stats": ...]}``,
    plain nested dicts of arrays (cast them with :func:`jaxrecover.cast_variables`, save them like any pytree)."""
    if not is_nnx(module):
        raise TypeError(f"model_variables takes a Flax NNX module, got {type(module).__name__}; a Linen module's "
                        "variables come from jaxrecover.init_variables(module, key, example=x)")
    _, params, stats, _ = _split(module)
    out = {"params": nnx.to_pure_dict(params)}
    if jax.tree.leaves(stats):
        out["batch_stats"] = nnx.to_pure_dict(stats)
    return out


def _fill(abstract, pure):
    state = jax.tree.map(lambda a: a, abstract)  # a fresh State of the same structure
    nnx.replace_by_pure_dict(state, pure)
    return state


def nnx_model(module: nnx.Module, input_shape=None):
    """A :class:`Model` of an NNX module whose ``__call__(x[B, ...])`` returns logits ``[B, C]``, called with
    :func:`model_variables`-style variables (merged into the graph in eval mode at every call)."""
    from .interface import Model

    graphdef, params, stats, rest = _split(module)

    def graph(variables):
        """A fresh copy of the module in eval mode holding ``variables``."""
        if not isinstance(variables, dict) or "params" not in variables:
            raise TypeError("an NNX model takes the variables of jaxrecover.model_variables(module) "
                            "({'params': ..., ['batch_stats': ...]}), got " + type(variables).__name__)
        filled = stats
        if jax.tree.leaves(stats):
            if "batch_stats" not in variables:
                raise KeyError("this NNX module has BatchNorm statistics: pass jaxrecover.model_variables(module), "
                               "which holds them under 'batch_stats'")
            filled = _fill(stats, variables["batch_stats"])
        return nnx.merge(graphdef, _fill(params, variables["params"]), filled, rest)

    def batch_fn(variables, x):
        return graph(variables)(x)

    name = type(module).__name__
    return Model(_one(name, batch_fn, input_shape), name=name, input_shape=input_shape, batch_fn=batch_fn,
                 graph=graph)
