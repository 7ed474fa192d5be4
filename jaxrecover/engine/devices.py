"""Devices and processes: data-parallel shardings, multi-process shares and exact all-gathers.

The only module of the package that knows about devices and processes.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["data_parallel", "spans_processes", "place", "local_rows", "process_share", "allgather_float64",
           "agreed", "max_over_processes"]


def data_parallel(devices=None, multihost: bool = False):
    """``(batch_sharding, replicated_sharding)`` over ``devices`` (default: all local devices).

    Returns ``(None, None)`` on a single device. Batches are split along their
    leading axis (data parallelism); parameters are replicated. With
    ``multihost=True`` in a multi-process JAX run (``jax.distributed``), the
    default is every device of every process: each process then passes its OWN
    examples and gets its own results back (:func:`jaxrecover.engine.map_chunks`).
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if devices is None:
        devices = jax.devices() if multihost and jax.process_count() > 1 else jax.local_devices()
    devices = list(devices)
    if len(devices) < 2:
        return None, None
    mesh = Mesh(np.array(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def spans_processes(sharding) -> bool:
    """True when ``sharding`` covers devices of other processes."""
    return sharding is not None and not sharding.is_fully_addressable


def place(a, sharding):
    """A process-local chunk on ``sharding``; across processes the chunks of all processes form one global batch."""
    if sharding is None:
        return a
    if spans_processes(sharding):
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))
    return jax.device_put(a, sharding)


def local_rows(out, sharding):
    """This process's rows of a (global) batch output."""
    if not spans_processes(sharding):
        return out
    from jax.experimental import multihost_utils

    return multihost_utils.global_array_to_host_local_array(out, sharding.mesh, sharding.spec)


def max_over_processes(value: int) -> int:
    """The largest ``value`` any process passes (every process must call it); ``value`` in one process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def agreed(flag: bool) -> bool:
    """``flag`` as process 0 sees it (multi-process runs must all take the same branch; no-op otherwise)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def process_share(n: int) -> tuple[int, int, list[int]]:
    """This process's contiguous share ``[lo, hi)`` of ``n`` items and every process's bounds."""
    count, me = jax.process_count(), jax.process_index()
    bounds = [n * i // count for i in range(count + 1)]
    return bounds[me], bounds[me + 1], bounds


def allgather_float64(local: np.ndarray, bounds: list[int]) -> np.ndarray:
    """Concatenate every process's float64 share (``bounds`` from :func:`process_share`), bit-exactly.

    The values travel as pairs of uint32, so the gather is exact even with x64 off.
    """
    from jax.experimental import multihost_utils

    width = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = np.full(width, np.nan)
    padded[: len(local)] = local
    bits = np.ascontiguousarray(padded, np.float64).view(np.uint32)
    gathered = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(bits), np.uint32)).view(np.float64)
    return np.concatenate([gathered[i, : bounds[i + 1] - bounds[i]] for i in range(len(bounds) - 1)])
