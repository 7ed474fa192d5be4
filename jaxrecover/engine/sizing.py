"""Automatic chunk and micro-batch sizes, from the model's forward footprint (no compilation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AUTO_CHUNK_BYTES", "AUTO_CHUNK_MAX", "AUTO_LOOP_CHUNK", "AUTO_LOOP_BYTES", "AUTO_LOOP_WEIGHT_RATIO",
           "shape_key", "forward_bytes", "auto_chunk_size",
           "auto_micro_batch"]

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

_FORWARD_BYTES: dict = {}


def shape_key(model, params, x_one) -> tuple:
    """A cache key for facts that depend only on the model, the parameters' shapes and dtypes, and the input's."""
    shapes = tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a)))) for a in jax.tree.leaves(params))
    return (model, jax.tree.structure(params), shapes, tuple(x_one.shape), str(x_one.dtype))


def forward_bytes(model, params, x_one) -> int:
    """Bytes of the intermediate values of ONE forward pass per example (from the jaxpr, no compilation).

    Counted as the growth from a batch of one to a batch of two, so work on the
    parameters alone (kernel reshapes, gathers) does not count. Cached per
    model, parameter shapes and input shape.
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

    key = shape_key(model, params, x_one)
    if key not in _FORWARD_BYTES:
        batched = jax.vmap(model, in_axes=(None, 0))
        one, two = (total(jax.make_jaxpr(batched)(params, jnp.stack([x_one] * k)).jaxpr) for k in (1, 2))
        _FORWARD_BYTES[key] = max(two - one, 1)
    return _FORWARD_BYTES[key]


def auto_chunk_size(model, params, x_one, points_per_example: int, n: int, devices: int = 1,
                    micro_batch: int | None = None) -> int:
    """Examples per chunk so one chunk's forward intermediates are about :data:`AUTO_CHUNK_BYTES` per device.

    ``points_per_example``: gradient evaluations per example (IG's path points).
    With a ``micro_batch`` loop only one micro-batch's intermediates are live,
    so chunks hold :data:`AUTO_LOOP_CHUNK` examples (or more micro-batches when
    they are larger). Between 1 and ``min(n, AUTO_CHUNK_MAX)``.
    """
    if micro_batch is not None:
        return int(min(n, AUTO_CHUNK_MAX, max(AUTO_LOOP_CHUNK, 4 * micro_batch)))
    per_example = forward_bytes(model, params, x_one) * max(points_per_example, 1)
    return int(np.clip(AUTO_CHUNK_BYTES * devices // per_example, 1, max(1, min(n, AUTO_CHUNK_MAX))))


def auto_micro_batch(model, params, x_one, points_per_example: int) -> int | None:
    """Examples per loop step inside a compiled chunk on the CPU (None elsewhere: one vmap).

    On XLA:CPU a chunk of thousands of path points runs up to 1.7x slower per
    point than a loop over small micro-batches (benchmarks/bench_batch.py,
    docs/PERFORMANCE.md): each call's temporary buffer is freshly mapped and
    page-faulted once it exceeds glibc's mmap threshold (32 MiB), and the
    intermediates of a big batch spill out of cache. A micro-batch holds the
    single example unless more are needed for the parameters, streamed once per
    step, to be at most 1/:data:`AUTO_LOOP_WEIGHT_RATIO` of the micro-batch's
    intermediates (ResNet18: 4 images x 50 points; LeNet: 1 image). Models whose
    example has under :data:`AUTO_LOOP_BYTES` of intermediates (the two-layer
    nets) run whole chunks in one vmap: None.
    """
    if jax.default_backend() != "cpu":
        return None
    per_example = forward_bytes(model, params, x_one) * max(points_per_example, 1)
    weights = sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
    if per_example < AUTO_LOOP_BYTES:
        return None
    return max(1, -(-AUTO_LOOP_WEIGHT_RATIO * weights // per_example))
