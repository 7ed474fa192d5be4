"""Vanilla Gradient and Integrated Gradients as pure, jit-compatible functions.

Every public IG implementation approximates

    IG(x; b) = (x - b) * sum_i w_i * grad f(b + a_i (x - b))

with nodes ``a_i`` and weights ``w_i`` of a quadrature rule. :data:`RULES` is
the one table of those rules (see ``docs/RECOVERY.md`` and ``REFERENCES.md``):

=====================  ===========================================  ==========================  =========
rule                   nodes a_i                                    weights w_i                 min steps
=====================  ===========================================  ==========================  =========
riemann_right          i/n, i=1..n (the paper's eq. 1; Captum)      1/n                         2
riemann_left           i/n, i=0..n-1 (Captum; iNNvestigate 1.x)     1/n                         2
riemann_middle         (2i-1)/(2n), i=1..n (Captum)                 1/n                         2
riemann_trapezoid      i/(n-1), i=0..n-1 (Captum)                   1/n, ends 1/(2n); sum (n-1)/n  2
trapezoid              i/(n-1), i=0..n-1 (a correct trapezoid)      1/(n-1), ends 1/(2(n-1))   2
gausslegendre          (1+t_i)/2, numpy leggauss(n) (Captum default)  v_i/2                     1
saliency               k/(n-1), k=0..n-1, linspace (PAIR saliency)   1/n                         1
ig_original            k/n, k=0..n (n+1 points; Sundararajan code)   1/n, ends 1/(2n)            1
=====================  ===========================================  ==========================  =========

The minimum step counts are those the reference libraries accept (Captum
asserts ``n > 1`` for its Riemann rules). ``steps`` is always static: each step
count compiles once.

Single-example functions take a scalar function ``f(x) -> ()`` of ONE example;
the batched :func:`attribute` takes ``logit_fn(params, x)`` for one example
(see :func:`jaxrecover.models.make_logit_fn`), a batch ``x[N, ...]`` and
targets ``[N]``, and works in chunks of ``chunk_size`` examples so memory is
bounded by the chunk, not by N.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import ops

__all__ = [
    "RULES",
    "OUTPUTS",
    "QuadratureRule",
    "quadrature",
    "num_evaluations",
    "select_output",
    "vanilla_gradient",
    "path_points",
    "path_gradients",
    "integrated_gradients",
    "integrated_gradients_affine_stem",
    "completeness_delta",
    "attribute",
    "auto_chunk_size",
    "forward_bytes",
    "check_input_dtype",
    "data_parallel",
    "chunk_length",
    "map_chunks",
    "pad_chunk",
]


@dataclasses.dataclass(frozen=True)
class QuadratureRule:
    """Where a rule puts its nodes in [0, 1] and how it weights them.

    Attributes:
      name: the rule's name in this library.
      build: ``n -> (nodes, weights)``, float64 numpy arrays (nodes ascending).
      min_steps: the smallest step count the reference implementation accepts.
      source: where the rule comes from.
    """

    name: str
    build: Callable[[int], tuple[np.ndarray, np.ndarray]]
    min_steps: int
    source: str


def _uniform(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return nodes, np.full(nodes.shape, 1.0 / nodes.size)


def _trapezoid_weights(n_points: int, total: float) -> np.ndarray:
    w = np.full(n_points, total / max(n_points - 1, 1))
    w[0] /= 2
    w[-1] /= 2
    return w


def _captum_trapezoid(n):
    w = np.full(n, 1.0 / n)
    w[0] /= 2
    w[-1] /= 2
    return np.arange(n) / (n - 1), w


def _gauss_legendre(n):
    t, v = np.polynomial.legendre.leggauss(n)
    return (1.0 + t) / 2.0, v / 2.0


def _ig_original(n):
    return np.arange(n + 1) / n, _trapezoid_weights(n + 1, 1.0)


RULES: dict[str, QuadratureRule] = {
    r.name: r
    for r in (
        QuadratureRule("riemann_right", lambda n: _uniform(np.arange(1, n + 1) / n), 2,
                       "the paper's eq. (1); Captum riemann_right"),
        QuadratureRule("riemann_left", lambda n: _uniform(np.arange(n) / n), 2,
                       "Captum riemann_left; iNNvestigate 1.x"),
        QuadratureRule("riemann_middle", lambda n: _uniform((2 * np.arange(1, n + 1) - 1) / (2 * n)), 2,
                       "Captum riemann_middle"),
        QuadratureRule("riemann_trapezoid", _captum_trapezoid, 2,
                       "Captum riemann_trapezoid (weights sum to (n-1)/n, as Captum has it)"),
        QuadratureRule("trapezoid", lambda n: (np.arange(n) / (n - 1), _trapezoid_weights(n, 1.0)), 2,
                       "a correct trapezoid rule on n points (weights sum to 1)"),
        QuadratureRule("gausslegendre", _gauss_legendre, 1, "Captum gausslegendre (Captum's default)"),
        QuadratureRule("saliency", lambda n: _uniform(np.linspace(0.0, 1.0, n)), 1,
                       "PAIR saliency IntegratedGradients (linspace with both ends)"),
        QuadratureRule("ig_original", _ig_original, 1,
                       "original IG code (ankurtaly/Integrated-Gradients): n+1 points, trapezoid"),
    )
}

#: What is explained: a class's logit, softmax probability or log-probability.
OUTPUTS = ("logit", "prob", "logprob")


def _rule(rule: str) -> QuadratureRule:
    try:
        return RULES[rule]
    except KeyError:
        raise ValueError(f"unknown IG rule {rule!r}; choose one of: {', '.join(RULES)}") from None


@functools.lru_cache(maxsize=256)
def _quadrature_cached(rule: str, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = _rule(rule).build(steps)
    return tuple(float(v) for v in nodes), tuple(float(v) for v in weights)


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``rule`` with ``steps`` steps, float64 numpy arrays.

    Raises:
      ValueError: unknown rule, or ``steps`` below the rule's minimum.
    """
    r = _rule(rule)
    if not isinstance(steps, (int, np.integer)) or steps < r.min_steps:
        raise ValueError(f"rule {rule!r} needs an integer steps >= {r.min_steps}, got {steps!r}")
    nodes, weights = _quadrature_cached(rule, int(steps))
    return np.array(nodes, np.float64), np.array(weights, np.float64)


def num_evaluations(rule: str, steps: int) -> int:
    """Gradient evaluations one IG answer of ``rule`` with ``steps`` steps costs."""
    return quadrature(rule, steps)[0].size


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


def select_output(logits: jax.Array, target, output: str = "logit") -> jax.Array:
    """The explained scalar of one example's logits ``[C]``: logit, prob or logprob of ``target``."""
    if output == "logit":
        return logits[target]
    if output == "prob":
        return jax.nn.softmax(logits)[target]
    if output == "logprob":
        return jax.nn.log_softmax(logits)[target]
    raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")


def vanilla_gradient(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """VG_f(x) = grad f(x) for a scalar ``f`` of one example; same shape and dtype as ``x``."""
    return jax.grad(f)(x)


def path_points(x: jax.Array, baseline: jax.Array, nodes) -> jax.Array:
    """``b + a_i (x - b)`` for every node: shape ``(n, *x.shape)``, dtype of ``x``."""
    a = jnp.asarray(nodes, x.dtype).reshape((-1,) + (1,) * x.ndim)
    return baseline[None] + a * (x - baseline)[None]


def path_gradients(f, x, baseline, nodes) -> jax.Array:
    """All ``grad f`` at the path points, from ONE ``jax.vmap``: ``(n, *x.shape)``."""
    return jax.vmap(jax.grad(f))(path_points(x, baseline, nodes))


def integrated_gradients(
    f: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 50,
    rule: str = "riemann_right",
) -> jax.Array:
    """IG of a scalar ``f`` of one example under a quadrature ``rule``.

    Args:
      f: scalar function of one example.
      x: the example, float32/float64 of any shape.
      baseline: same shape and dtype as ``x``; default zeros.
      steps: the rule's step count (static).
      rule: one of :data:`RULES`.

    Returns:
      ``(x - b) * sum_i w_i grad f(b + a_i (x - b))``, shape and dtype of ``x``.
    """
    nodes, weights = quadrature(rule, steps)
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    grads = path_gradients(f, x, baseline, nodes)
    return (x - baseline) * jnp.tensordot(jnp.asarray(weights, x.dtype), grads, axes=1)


def integrated_gradients_affine_stem(
    stem: Callable[[jax.Array], jax.Array],
    body: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 50,
    rule: str = "riemann_right",
) -> jax.Array:
    """IG of ``f = body o stem`` for an AFFINE ``stem`` (a model's first layer), the stem computed once.

    An affine stem ``s(z) = A z + c`` maps the straight path to a straight path,
    ``s(b + a (x - b)) = s(b) + a (s(x) - s(b))``, and ``grad f(z) = A^T grad body(s(z))``,
    so ``sum_i w_i grad f(z_i) = A^T sum_i w_i grad body(h_i)``: ONE stem forward
    at ``x`` and ``b`` and ONE transpose (the stem's VJP, the same at every point)
    instead of one of each per path point. The body is differentiated at all
    points by one ``jax.vmap``. Equal to :func:`integrated_gradients` of
    ``body o stem`` up to round-off (tests/test_attribution.py).
    """
    nodes, weights = quadrature(rule, steps)
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    s_x, stem_transpose = jax.vjp(stem, x)
    grads = path_gradients(body, s_x, stem(baseline), nodes)
    w = jnp.asarray(weights, s_x.dtype).reshape((-1,) + (1,) * s_x.ndim)
    (total,) = stem_transpose(jnp.sum(w * grads, axis=0))  # a fused multiply-reduce (a tensordot copies)
    return (x - baseline) * total


def completeness_delta(f, x, baseline, attribution) -> jax.Array:
    """Captum's convergence delta: ``sum(IG) - (f(x) - f(b))`` (0 for exact IG)."""
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    return jnp.sum(attribution) - (f(x) - f(baseline))


# --------------------------------------------------------------------------- batched


@ops.tuned_jit(static_argnames=("logit_fn", "method", "steps", "rule", "output", "factor_stem", "micro_batch"))
def _attribute_chunk(logit_fn, params, x, target, baseline, *, method, steps, rule, output, factor_stem=True,
                     micro_batch=None):
    split = getattr(logit_fn, "affine_stem", None) if factor_stem else None

    def one(xi, ti, bi):
        def f(z):
            return select_output(logit_fn(params, z), ti, output)

        if method == "vg":
            return vanilla_gradient(f, xi)
        if split is not None:
            return integrated_gradients_affine_stem(
                lambda z: split.stem(params, z), lambda h: select_output(split.body(params, h), ti, output),
                xi, bi, steps=steps, rule=rule)
        return integrated_gradients(f, xi, bi, steps=steps, rule=rule)

    return vmap_in_micro_batches(one, (x, target, baseline), micro_batch)


def vmap_in_micro_batches(fn, args: tuple, micro_batch: int | None):
    """``jax.vmap(fn)(*args)``, or a loop (``lax.map``) over micro-batches of ``micro_batch`` examples.

    The loop computes the same values; on the CPU it is faster when one
    micro-batch's intermediates stay in cache and XLA allocates its temporary
    buffer once per call instead of once per chunk (:func:`auto_micro_batch`).
    """
    n = args[0].shape[0]
    if micro_batch is None or micro_batch >= n:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=micro_batch)


def attribute(
    logit_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x,
    target,
    *,
    method: str = "ig",
    steps: int = 50,
    rule: str = "riemann_right",
    baseline=None,
    output: str = "logit",
    chunk_size: int | str | None = "auto",
    progress: bool = False,
    shard: bool = True,
    devices=None,
    factor_stem: bool = True,
    micro_batch: int | str | None = "auto",
) -> jax.Array:
    """VG or IG of a batch, in jitted chunks of ``chunk_size`` examples.

    Args:
      logit_fn: ``logit_fn(params, x_one) -> logits[C]`` for ONE example. Build
        it once (``make_logit_fn``): a new function object compiles anew.
      params: the model's variables (same float dtype as ``x``).
      x: ``[N, *shape]`` float32 or float64 (float64 needs ``jax_enable_x64``).
      target: ``[N]`` integer class indices (e.g. the true labels).
      method: ``"ig"`` or ``"vg"``.
      steps, rule: the IG quadrature (see :data:`RULES`).
      baseline: ``[N, *shape]``, ``[*shape]`` or None (zeros).
      output: ``"logit"``, ``"prob"`` or ``"logprob"`` of the target class.
      chunk_size: examples per compiled call; ``"auto"`` (default) sizes
        chunks by the model's forward intermediates (:func:`auto_chunk_size`);
        ``None``: all at once. Every chunk has the same shape (the last is
        padded), so one compilation serves the whole batch.
      progress: show a progress bar over the chunks.
      shard: split every chunk across ``devices`` with ``jax.sharding``; a
        no-op on one device. Default devices: all local ones, or in a
        multi-process run (``jax.distributed.initialize``) all devices of all
        processes, each process passing its own examples and getting its own
        attributions back (every process must call ``attribute`` together).
      devices: the devices to use when sharding.
      factor_stem: when ``logit_fn`` carries an ``affine_stem`` split (every
        ``make_logit_fn`` model does), compute IG with
        :func:`integrated_gradients_affine_stem`: the first layer once per
        example, not per path point. The same IG up to round-off; False
        differentiates ``logit_fn`` itself at every point.
      micro_batch: examples per step of a loop inside each chunk's compiled
        call (``lax.map``); None: the whole chunk in one ``jax.vmap``.
        ``"auto"`` (default): a loop on the CPU (:func:`auto_micro_batch`),
        one vmap on accelerators and when sharding over several devices.
        Same values either way, up to round-off.

    Returns:
      ``[N, *shape]`` attributions, dtype of ``x``.
    """
    dtype = check_input_dtype(x)
    if method not in ("ig", "vg"):
        raise ValueError(f"unknown method {method!r}; choose 'ig' or 'vg'")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")
    if method == "ig":
        quadrature(rule, steps)  # validate early
    x = jnp.asarray(x, dtype)
    n = x.shape[0]
    target = jnp.asarray(target, jnp.int32)
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},), got {target.shape}")
    if baseline is None:
        baseline = jnp.zeros_like(x)
    else:
        baseline = jnp.asarray(baseline)
        if baseline.dtype != dtype:
            raise TypeError(f"baseline dtype {baseline.dtype} differs from the input's {dtype}")
        baseline = jnp.broadcast_to(baseline, x.shape)
    kwargs = dict(method=method, steps=steps if method == "ig" else 0, rule=rule if method == "ig" else "", output=output,
                  factor_stem=bool(factor_stem))
    batch_sharding, replicated = data_parallel(devices, multihost=True) if shard else (None, None)
    points = num_evaluations(rule, steps) if method == "ig" else 1
    if micro_batch == "auto":
        micro_batch = None if batch_sharding is not None else auto_micro_batch(logit_fn, params, x[0], points)
    elif micro_batch is not None and (isinstance(micro_batch, str) or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive int, None or 'auto', got {micro_batch!r}")
    if chunk_size == "auto":
        ndev = 1 if batch_sharding is None else len(batch_sharding.addressable_devices)
        chunk_size = auto_chunk_size(logit_fn, params, x[0], points, n, devices=ndev, micro_batch=micro_batch)
    kwargs["micro_batch"] = micro_batch
    if replicated is not None:
        params = jax.device_put(params, replicated)
    return map_chunks(
        lambda xs, ts, bs: _attribute_chunk(logit_fn, params, xs, ts, bs, **kwargs),
        (x, target, baseline), chunk_size, progress=progress, desc=method.upper(), sharding=batch_sharding,
    )


#: ``chunk_size="auto"`` without a micro-batch loop (accelerators, sharded runs, small models): forward
#: intermediates per chunk and device (bytes), about 16 images x 50 path points of LeNet or ResNet18; the
#: two-layer nets get whole batches, so per-chunk dispatch does not dominate.
AUTO_CHUNK_BYTES = 3 * 2**29
#: ``chunk_size="auto"`` never exceeds this many examples.
AUTO_CHUNK_MAX = 1024
#: ``chunk_size="auto"`` with a micro-batch loop (CPU): examples per compiled call.
AUTO_LOOP_CHUNK = 256
#: ``micro_batch="auto"``: no loop for examples with fewer forward intermediates (bytes, jaxpr count).
AUTO_LOOP_BYTES = 2**25
#: ``micro_batch="auto"``: a micro-batch's intermediates are at least this many times the parameter bytes.
AUTO_LOOP_WEIGHT_RATIO = 8


def forward_bytes(logit_fn, params, x_one) -> int:
    """Bytes of the intermediate values of ONE forward pass per example (from the jaxpr, no compilation).

    Counted as the growth from a batch of one to a batch of two, so work on the
    parameters alone (kernel reshapes, gathers) does not count.
    """

    def total(jaxpr) -> int:
        size = 0
        for eqn in jaxpr.eqns:
            size += sum(int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize for v in eqn.outvars
                        if hasattr(v.aval, "shape"))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    size += total(getattr(inner, "jaxpr", inner))
        return size

    shapes = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(params))
    key = (logit_fn, jax.tree.structure(params), shapes, tuple(x_one.shape), str(x_one.dtype))
    if key not in _FORWARD_BYTES:  # traced once per function and shapes: oracles call attribute per query
        batched = jax.vmap(logit_fn, in_axes=(None, 0))
        one, two = (total(jax.make_jaxpr(batched)(params, jnp.stack([x_one] * k)).jaxpr) for k in (1, 2))
        _FORWARD_BYTES[key] = max(two - one, 1)
    return _FORWARD_BYTES[key]


_FORWARD_BYTES: dict = {}


def auto_chunk_size(logit_fn, params, x_one, points_per_example: int, n: int, devices: int = 1,
                    micro_batch: int | None = None) -> int:
    """Examples per chunk so one chunk's forward intermediates are about :data:`AUTO_CHUNK_BYTES` per device.

    ``points_per_example``: gradient evaluations per example (IG's path points).
    With a ``micro_batch`` loop only one micro-batch's intermediates are live,
    so chunks hold :data:`AUTO_LOOP_CHUNK` examples (or more micro-batches when
    they are larger). Between 1 and ``min(n, AUTO_CHUNK_MAX)``.
    """
    if micro_batch is not None:
        return int(min(n, AUTO_CHUNK_MAX, max(AUTO_LOOP_CHUNK, 4 * micro_batch)))
    per_example = forward_bytes(logit_fn, params, x_one) * max(points_per_example, 1)
    return int(np.clip(AUTO_CHUNK_BYTES * devices // per_example, 1, max(1, min(n, AUTO_CHUNK_MAX))))


def auto_micro_batch(logit_fn, params, x_one, points_per_example: int) -> int | None:
    """Examples per loop step inside a compiled chunk on the CPU (None elsewhere: one vmap).

    On XLA:CPU a chunk of thousands of path points runs up to 1.7x slower per
    point than a loop over small micro-batches (benchmarks/bench_ig.py,
    docs/PERFORMANCE.md): each call's temporary buffer is freshly mapped and
    page-faulted once it exceeds glibc's mmap threshold (32 MiB), and the
    intermediates of a big batch spill out of cache. A micro-batch holds the
    single example unless more are needed for the parameters, streamed once per
    step, to be at most 1/:data:`AUTO_LOOP_WEIGHT_RATIO` of the micro-batch's
    intermediates (ResNet18's 45 MB of weights: 4 images x 50 points; LeNet:
    1 image). Models whose example has under :data:`AUTO_LOOP_BYTES` of
    intermediates (the two-layer nets) run whole chunks in one vmap: None.
    """
    if jax.default_backend() != "cpu":
        return None
    per_example = forward_bytes(logit_fn, params, x_one) * max(points_per_example, 1)
    weights = sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
    if per_example < AUTO_LOOP_BYTES:
        return None
    return max(1, -(-AUTO_LOOP_WEIGHT_RATIO * weights // per_example))


def data_parallel(devices=None, multihost: bool = False):
    """``(batch_sharding, replicated_sharding)`` over ``devices`` (default: all local devices).

    Returns ``(None, None)`` on a single device. Batches are split along their
    leading axis (data parallelism); parameters are replicated. With
    ``multihost=True`` in a multi-process JAX run (``jax.distributed``), the
    default is every device of every process: each process then passes its OWN
    examples and gets its own results back (:func:`map_chunks`).
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if devices is None:
        devices = jax.devices() if multihost and jax.process_count() > 1 else jax.local_devices()
    devices = list(devices)
    if len(devices) < 2:
        return None, None
    mesh = Mesh(np.array(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def _spans_processes(sharding) -> bool:
    return sharding is not None and not sharding.is_fully_addressable


def _place(a, sharding):
    """A process-local chunk on ``sharding``; across processes the chunks of all processes form one global batch."""
    if sharding is None:
        return a
    if _spans_processes(sharding):
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))
    return jax.device_put(a, sharding)


def _local_rows(out, sharding):
    """This process's rows of a (global) batch output."""
    if not _spans_processes(sharding):
        return out
    from jax.experimental import multihost_utils

    return multihost_utils.global_array_to_host_local_array(out, sharding.mesh, sharding.spec)


def chunk_length(chunk_size: int | None, n: int, sharding=None) -> int:
    """Examples per chunk: ``chunk_size`` (all ``n`` if None), rounded up to a multiple of the devices."""
    chunk = n if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
        out.append(_place(p, sharding))
    return out


def map_chunks(fn, arrays: tuple, chunk_size: int | None, *, progress: bool = False, desc: str = "",
               sharding=None) -> Any:
    """Apply ``fn(*chunk)`` over the leading axis in equal chunks and concatenate.

    The last chunk is padded by repeating its final row, so ``fn`` sees one
    shape and a jitted ``fn`` compiles once. With a batch ``sharding`` (see
    :func:`data_parallel`) each chunk is split across its devices; the chunk
    size is then rounded up to a multiple of the device count.
    """
    from tqdm.auto import tqdm

    n = arrays[0].shape[0]
    chunk = chunk_length(chunk_size, n, sharding)
    starts = list(range(0, n, chunk))
    if _spans_processes(sharding):  # every process runs the same number of chunks (SPMD); extras are padding
        from jax.experimental import multihost_utils

        most = int(np.max(multihost_utils.process_allgather(np.int32(len(starts)))))
        starts += [starts[-1]] * (most - len(starts))
    outs = []
    for i, s in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        k = min(chunk, n - s)
        out = _local_rows(fn(*pad_chunk([a[s : s + k] for a in arrays], chunk, sharding)), sharding)
        if i < -(-n // chunk):
            outs.append(jax.tree.map(lambda o, k=k: o[:k], out))
    if len(outs) == 1:
        return outs[0]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
