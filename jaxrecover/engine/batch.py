"""The batch engine: run ANY single-example explainer over a batch.

:func:`explain` validates the batch, sizes chunks from the model's footprint,
runs each chunk in ONE compiled call (``jax.vmap`` of the explainer, or on the
CPU a ``lax.map`` loop over micro-batches inside it), pads the last chunk so
one compilation serves every chunk, splits chunks across devices (data
parallel; multi-process runs too) and shows a progress bar on request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import ops, validate
from ..explainers import OUTPUTS, Explainer, completeness_delta, select_output
from ..models import Model, as_model
from .devices import data_parallel, local_rows, max_over_processes, place, spans_processes
from .sizing import auto_chunk_size, auto_micro_batch, shape_key

__all__ = ["explain", "convergence_delta", "map_chunks", "chunk_length", "pad_chunk", "vmap_in_micro_batches",
           "check_input_dtype", "check_targets", "check_finite", "check_finite_params"]


def check_input_dtype(x) -> jnp.dtype:
    """A float32/float64 input, and float64 only with ``jax_enable_x64`` on."""
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"inputs must be float32 or float64, got {dtype}; normalise images with "
                        "jaxrecover.data.normalize")
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError(
            "a float64 input was given but jax_enable_x64 is off, so JAX would silently compute in float32. "
            "Enable it first (jax.config.update('jax_enable_x64', True), JAX_ENABLE_X64=1 or "
            "`with jax.enable_x64(True):`), or pass float32."
        )
    return jnp.dtype(dtype)


def check_finite(name: str, a) -> None:
    """A clear error when ``a`` holds NaN or inf (they would give silently wrong attributions)."""
    a = np.asarray(a)
    if a.size and not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{name} holds {bad} NaN/inf value(s); attributions of non-finite inputs are "
                         "meaningless: clean or drop those examples first")


def check_targets(target, n: int, num_classes: int | None) -> jax.Array:
    """Targets as an int32 ``[n]`` array, each in ``[0, num_classes)`` (JAX would silently clip them)."""
    return jnp.asarray(validate.class_labels(target, n, num_classes))


_NUM_CLASSES: dict = {}


def _num_classes(model: Model, params, x_one, batch_shape=None) -> int | None:
    """The model's number of outputs (traced once per model, parameter shapes and input shape).

    Raises:
      ValueError: the model does not return ONE vector of logits ``[C]`` for one example (a scalar, or a
        batch such as ``(1, C)``), or fails on an example of this shape where its input shape is known.
    """
    key = shape_key(model, params, x_one)
    if key not in _NUM_CLASSES:
        if model.input_shape is not None and tuple(x_one.shape) != tuple(model.input_shape):
            got = tuple(batch_shape) if batch_shape is not None else ("N",) + tuple(x_one.shape)
            raise ValueError(f"{model.name} takes examples of shape {tuple(model.input_shape)}, so x must be a batch "
                             f"(N, {', '.join(map(str, model.input_shape))}); got x of shape {got} (for one example "
                             "pass x[None])")
        try:
            out = jax.eval_shape(model, params, x_one)
        except Exception:  # noqa: BLE001 - the real call raises the model's own clear error later
            return None
        if len(out.shape) != 1:
            raise ValueError(
                f"the model must return logits [C] for ONE example, but it returned shape {tuple(out.shape)} for an "
                f"example of shape {tuple(x_one.shape)}; "
                + ("wrap a batch-returning function as lambda p, x: f(p, x[None])[0]" if len(out.shape) > 1 else
                   "return every class's logit, not one number"))
        _NUM_CLASSES[key] = int(out.shape[0])
    return _NUM_CLASSES[key]


_FINITE_PARAMS: list = []  # (leaves kept alive, so their ids stay unique) of parameter trees checked finite


def check_finite_params(params) -> None:
    """A clear error when the model's parameters hold NaN/inf (every answer would be silently wrong).

    One jitted reduction per parameter tree; the last few trees checked are remembered by identity.
    """
    leaves = [a for a in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return  # differentiated or traced through: the values are not known here
    ids = tuple(map(id, leaves))
    if any(ids == tuple(map(id, kept)) for kept in _FINITE_PARAMS):
        return
    bad = int(_count_nonfinite(leaves)) if leaves else 0
    if bad:
        raise ValueError(f"the model's parameters hold {bad} NaN/inf value(s), so every logit and gradient would be "
                         "meaningless; reload or retrain the weights")
    _FINITE_PARAMS.append(leaves)
    del _FINITE_PARAMS[:-8]


@jax.jit
def _count_nonfinite(leaves):
    return sum(jnp.sum(~jnp.isfinite(a)) for a in leaves)


@ops.tuned_jit(static_argnames=("model", "output", "micro_batch"))
def explain_chunk(explainer, model, params, x, target, baseline, *, output, micro_batch=None):
    """The jitted body of one chunk: ``explainer`` vmapped (or looped in micro-batches) over ``x[N, ...]``.

    :func:`explain` calls it per chunk after validating, padding and sharding; benchmarks lower and time it.
    """
    def one(xi, ti, bi):
        return explainer(model, params, xi, ti, bi, output)

    return vmap_in_micro_batches(one, (x, target, baseline), micro_batch)


def vmap_in_micro_batches(fn, args: tuple, micro_batch: int | None):
    """``jax.vmap(fn)(*args)``, or a loop (``lax.map``) over micro-batches of ``micro_batch`` examples.

    The loop computes the same values; on the CPU it is faster when one
    micro-batch's intermediates stay in cache and XLA allocates its temporary
    buffer once per call instead of once per chunk
    (:func:`jaxrecover.engine.auto_micro_batch`).
    """
    n = args[0].shape[0]
    if micro_batch is None or micro_batch >= n:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=micro_batch)


def _prepare(model, params, x, target, baseline):
    """Validated ``(model, x, target, baseline)`` of a batch (shared by :func:`explain` and its helpers)."""
    model = as_model(model)
    dtype = check_input_dtype(x)
    x = jnp.asarray(x, dtype)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"explain needs a non-empty batch x[N, ...], got shape {tuple(x.shape)}")
    check_finite("x", x)
    check_finite_params(params)
    n = x.shape[0]
    target = check_targets(target, n, _num_classes(model, params, x[0], x.shape))
    if baseline is None:
        baseline = jnp.zeros_like(x)
    else:
        baseline = jnp.asarray(baseline)
        if baseline.dtype != dtype:
            raise TypeError(f"baseline dtype {baseline.dtype} differs from the input's {dtype}; cast it")
        if baseline.shape not in (x.shape, x.shape[1:]):
            raise ValueError(f"baseline must have shape {tuple(x.shape)} or {tuple(x.shape[1:])}, "
                             f"got {tuple(baseline.shape)}")
        check_finite("baseline", baseline)
        baseline = jnp.broadcast_to(baseline, x.shape)
    return model, x, target, baseline


def explain(
    explainer: Explainer,
    model: Model | Callable,
    params: Any,
    x,
    target,
    *,
    baseline=None,
    output: str = "logit",
    chunk_size: int | str | None = "auto",
    micro_batch: int | str | None = "auto",
    progress: bool = False,
    shard: bool = True,
    devices=None,
) -> jax.Array:
    """Run ``explainer`` over a batch, in jitted chunks.

    Args:
      explainer: any :class:`jaxrecover.explainers.Explainer` (``VG()``,
        ``IG(steps=50, rule="riemann_right")``, ...).
      model: a :class:`jaxrecover.models.Model`, or a plain
        ``logit_fn(params, x_one) -> logits[C]`` for ONE example. Build it once:
        a new function object compiles anew.
      params: the model's variables (same float dtype as ``x``).
      x: ``[N, *shape]`` float32 or float64 (float64 needs ``jax_enable_x64``), finite.
      target: ``[N]`` integer class indices in ``[0, C)`` (or one int for all).
      baseline: ``[N, *shape]``, ``[*shape]`` or None (zeros).
      output: ``"logit"``, ``"prob"`` or ``"logprob"`` of the target class.
      chunk_size: examples per compiled call; ``"auto"`` (default) sizes chunks
        by the model's forward intermediates (:func:`jaxrecover.engine.auto_chunk_size`);
        ``None``: all at once. The last chunk is padded, so one compilation
        serves the whole batch.
      micro_batch: examples per step of a loop inside each chunk's compiled
        call (``lax.map``); None: the whole chunk in one ``jax.vmap``.
        ``"auto"`` (default): a loop on the CPU where it is faster
        (:func:`jaxrecover.engine.auto_micro_batch`), one vmap on accelerators
        and when sharding. Same values either way, up to round-off.
      progress: show a progress bar over the chunks.
      shard: split every chunk across ``devices`` (data parallel); a no-op on
        one device. Default devices: all local ones, or in a multi-process run
        (``jax.distributed.initialize``) all devices of all processes, each
        process passing its own examples and getting its own attributions back.
      devices: the devices to use when sharding.

    Returns:
      ``[N, *shape]`` attributions, dtype of ``x``.
    """
    if not isinstance(explainer, Explainer):
        raise TypeError(f"explainer must be a jaxrecover Explainer such as IG() or VG(), got {explainer!r}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")
    model, x, target, baseline = _prepare(model, params, x, target, baseline)
    n = x.shape[0]
    batch_sharding, replicated = data_parallel(devices, multihost=True) if shard else (None, None)
    points = explainer.evaluations
    if micro_batch == "auto":
        micro_batch = None if batch_sharding is not None else auto_micro_batch(model, params, x[0], points)
    elif micro_batch is not None and (isinstance(micro_batch, (str, bool)) or not isinstance(micro_batch, int)
                                      or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive int, None or 'auto', got {micro_batch!r}")
    if chunk_size == "auto":
        ndev = 1 if batch_sharding is None else len(batch_sharding.addressable_devices)
        chunk_size = auto_chunk_size(model, params, x[0], points, n, devices=ndev, micro_batch=micro_batch)
    if replicated is not None:
        params = jax.device_put(params, replicated)
    return map_chunks(
        lambda xs, ts, bs: explain_chunk(explainer, model, params, xs, ts, bs, output=output,
                                          micro_batch=micro_batch),
        (x, target, baseline), chunk_size, progress=progress, desc=explainer.name.upper(), sharding=batch_sharding,
    )


def convergence_delta(model, params, x, target, attributions, *, baseline=None, output: str = "logit") -> jax.Array:
    """Captum's ``return_convergence_delta``: ``sum(IG) - (f(x) - f(b))`` per example, ``[N]``."""
    model, x, target, baseline = _prepare(model, params, x, target, baseline)
    attributions = jnp.asarray(attributions)
    if attributions.shape != x.shape or attributions.dtype != x.dtype:
        raise ValueError(f"attributions must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(attributions.shape)}, {attributions.dtype}")
    return _convergence_delta(model, params, x, target, baseline, attributions, output)


@functools.partial(jax.jit, static_argnames=("model", "output"))
def _convergence_delta(model, params, x, target, baseline, attributions, output):
    def one(xi, ti, bi, ai):
        return completeness_delta(lambda z: select_output(model(params, z), ti, output), xi, bi, ai)

    return jax.vmap(one)(x, target, baseline, attributions)


def chunk_length(chunk_size: int | None, n: int, sharding=None) -> int:
    """Examples per chunk: ``chunk_size`` (all ``n`` if None), rounded up to a multiple of the devices."""
    chunk = n if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
    ndev = 1 if sharding is None else len(sharding.addressable_devices)  # this process's share of a chunk
    return -(-min(chunk, n) // ndev) * ndev


def pad_chunk(parts, chunk: int, sharding=None) -> list:
    """Pad each array of ``parts`` to ``chunk`` rows (repeating the last row) and place it on ``sharding``.

    Every chunk then has one shape, so a jitted function compiles once.
    """
    out = []
    for p in parts:
        short = chunk - p.shape[0]
        if short:
            p = jnp.concatenate([p, jnp.repeat(p[-1:], short, axis=0)])
        out.append(place(p, sharding))
    return out


def map_chunks(fn, arrays: tuple, chunk_size: int | None, *, progress: bool = False, desc: str = "",
               sharding=None, start: int = 0, on_chunk=None, keep: bool = True) -> Any:
    """Apply ``fn(*chunk)`` over the leading axis in equal chunks and concatenate.

    The last chunk is padded by repeating its final row, so ``fn`` sees one
    shape and a jitted ``fn`` compiles once. With a batch ``sharding`` (see
    :func:`jaxrecover.engine.data_parallel`) each chunk is split across its
    devices; the chunk size is then rounded up to a multiple of the device count.

    Resumable loops (the paper's protocol) pass ``start`` (rows before it are done: skipped) and
    ``on_chunk(lo, hi, out)``, called after every chunk with its unpadded output, e.g. to save progress;
    ``keep=False`` returns None instead of holding every output (``on_chunk`` has them).
    """
    from tqdm.auto import tqdm

    n = arrays[0].shape[0]
    if n == 0:
        raise ValueError("map_chunks needs at least one example (got an empty batch)")
    if not 0 <= start < n:
        raise ValueError(f"start={start} must lie in [0, {n}) (rows already done are skipped)")
    chunk = chunk_length(chunk_size, n, sharding)  # from n, not n - start: a resumed run keeps its shapes
    starts = list(range(start, n, chunk))
    if spans_processes(sharding):  # every process runs the same number of chunks (SPMD); extras are padding
        starts += [starts[-1]] * (max_over_processes(len(starts)) - len(starts))
    real = -(-(n - start) // chunk)
    outs = []
    for i, s in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        k = min(chunk, n - s)
        out = local_rows(fn(*pad_chunk([jnp.asarray(a[s : s + k]) for a in arrays], chunk, sharding)), sharding)
        if i < real:
            out = jax.tree.map(lambda o, k=k: o[:k], out)
            if on_chunk is not None:
                on_chunk(s, s + k, out)
            if keep:
                outs.append(out)
    if not keep:
        return None
    if len(outs) == 1:
        return outs[0]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
