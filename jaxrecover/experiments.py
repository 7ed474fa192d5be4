"""The paper's evaluation protocol: Table 1 and Experiments A, B, C, and Figure 5 data.

For each test image x (explained output: the logit of the true label, x' = 0, m = 50):

* ``table1``: distance(VG(x), IG_m(x))                         (every model)
* ``A``: eq. (2), VG ~ IG_m(x) / x                              (no-bias models)
* ``B``: eq. (4), VG ~ m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x     (models with bias)
* ``C``: eq. (3), VG ~ (IG_m(x) - IG_m(a x)) / ((1-a) x), a=0.98 (models with bias)

with the paper's metric (L2 distance of unit-normalised vectors).

Modes (recorded in every result):

``faithful`` (default)
    Each IG query is computed on its own, from its own input and step count,
    exactly as a service would answer it: 1 + m + (m-1) + m = 150 gradient
    evaluations per image for a model with bias (m = 50), 1 + m for a no-bias one.
``shared``
    Reuses gradient evaluations that are mathematically identical: the points
    of IG_{m-1}((m-1)/m x) are ``j/m x`` (those of IG_m(x)), and VG(x) is the
    last of them, so the protocol costs 2m = 100 evaluations. The points differ
    from the faithful ones only by float rounding; ``tests/test_evaluate.py``
    shows the two modes agree.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .attribution import (auto_micro_batch, check_input_dtype, chunk_length, data_parallel, integrated_gradients,
                          pad_chunk, path_gradients, select_output, vmap_in_micro_batches)
from . import ops
from .fileio import atomic_save_npz
from .metrics import normalized_distance, summarize
from .recovery import recover_eq2, recover_eq3, recover_eq4

__all__ = [
    "PAPER",
    "EXPERIMENTS",
    "ProtocolConfig",
    "experiments_for",
    "protocol_chunk",
    "run_protocol",
    "path_gradient_norms",
    "explain_examples",
]

#: The paper's numbers (mean, variance) per experiment and model (PAPER.md).
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "table1": {"twolayer_nobias": (1.682, 1.427e-1), "twolayer": (1.618, 1.468e-1), "lenet_nobias": (1.454, 9.211e-2),
               "lenet": (1.339, 8.050e-2), "resnet18": (1.238, 9.749e-2)},
    "A": {"twolayer_nobias": (3.708e-7, 2.058e-7), "lenet_nobias": (2.028e-3, 1.245e-2)},
    "B": {"twolayer": (2.028e-4, 1.414e-2), "lenet": (1.175e-2, 3.504e-2), "resnet18": (1.198, 4.926e-1)},
    "C": {"twolayer": (2.478e-2, 4.666e-2), "lenet": (8.368e-1, 9.391e-2), "resnet18": (1.392, 2.587e-1)},
}
EXPERIMENTS = ("table1", "A", "B", "C")


def experiments_for(model: str) -> tuple[str, ...]:
    """The experiments the paper runs on ``model``: A on no-bias models, B and C on the rest."""
    return ("table1", "A") if model.endswith("nobias") else ("table1", "B", "C")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Settings of one protocol run (hashable: it is a static jit argument)."""

    experiments: tuple[str, ...] = ("table1", "B", "C")
    steps: int = 50
    a: float = 0.98
    mode: str = "faithful"
    output: str = "logit"

    def __post_init__(self):
        if self.mode not in ("faithful", "shared"):
            raise ValueError(f"mode must be 'faithful' or 'shared', got {self.mode!r}")
        unknown = set(self.experiments) - set(EXPERIMENTS)
        if unknown:
            raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
        if self.steps < 2:
            raise ValueError("the protocol needs steps >= 2 (eq. 4 asks for m - 1 steps)")

    @property
    def evaluations_per_image(self) -> int:
        """Gradient evaluations one image costs in this mode."""
        m, e = self.steps, set(self.experiments)
        if self.mode == "shared":
            return m + (m if "C" in e else 0)
        return 1 + m + ((m - 1) if "B" in e else 0) + (m if "C" in e else 0)


def _metric_dtype(dtype):
    return jnp.float64 if jax.config.jax_enable_x64 else dtype


def _dist(vg, other, mask=None):
    dt = _metric_dtype(vg.dtype)
    return normalized_distance(vg.astype(dt), other.astype(dt), mask)


@ops.tuned_jit(static_argnames=("logit_fn", "cfg", "micro_batch"))
def protocol_chunk(logit_fn, params, x, target, cfg: ProtocolConfig, micro_batch: int | None = None
                   ) -> dict[str, jax.Array]:
    """Distances of every experiment for a chunk ``x[N, ...]`` (see module docstring).

    ``micro_batch``: examples per step of a loop inside the compiled call
    (None: one vmap); see :func:`jaxrecover.attribution.auto_micro_batch`.

    Returns:
      ``{experiment: distances[N]}``; distances are computed in float64 when
      x64 is on (whatever the attack's dtype), so the metric adds no float32 floor.
    """
    m, a = cfg.steps, cfg.a
    exps = set(cfg.experiments)

    def one(xi, ti):
        def f(z):
            return select_output(logit_fn(params, z), ti, cfg.output)

        if cfg.mode == "faithful":
            vg = jax.grad(f)(xi)
            ig_m = integrated_gradients(f, xi, steps=m)
            ig_m1 = integrated_gradients(f, ((m - 1) / m) * xi, steps=m - 1) if "B" in exps else None
            ig_a = integrated_gradients(f, a * xi, steps=m) if "C" in exps else None
        else:
            nodes = np.arange(1, m + 1) / m
            pts = np.concatenate([nodes, a * nodes]) if "C" in exps else nodes
            g = path_gradients(f, xi, jnp.zeros_like(xi), pts)
            w = jnp.asarray(1.0 / m, xi.dtype)
            vg = g[m - 1]
            ig_m = xi * w * jnp.sum(g[:m], axis=0)
            xq = jnp.asarray((m - 1) / m, xi.dtype) * xi
            ig_m1 = xq * jnp.asarray(1.0 / (m - 1), xi.dtype) * jnp.sum(g[: m - 1], axis=0)
            ig_a = (jnp.asarray(a, xi.dtype) * xi) * w * jnp.sum(g[m:], axis=0) if "C" in exps else None
        out = {}
        if "table1" in exps:
            out["table1"] = _dist(vg[None], ig_m[None])[0]
        if "A" in exps:
            rec, mask = recover_eq2(ig_m, xi)
            out["A"] = _dist(vg[None], rec[None], mask[None])[0]
        if "B" in exps:
            rec, mask = recover_eq4(ig_m, ig_m1, xi, m)
            out["B"] = _dist(vg[None], rec[None], mask[None])[0]
        if "C" in exps:
            rec, mask = recover_eq3(ig_m, ig_a, xi, a)
            out["C"] = _dist(vg[None], rec[None], mask[None])[0]
        return out

    return vmap_in_micro_batches(one, (x, target), micro_batch)


@ops.tuned_jit(static_argnames=("logit_fn", "steps", "output"))
def path_gradient_norms(logit_fn, params, x, target, steps: int = 50, output: str = "logit") -> jax.Array:
    """Figure 5: ``||grad f((i/m) x)||_2`` for i = 1..m, shape ``[N, m]``, dtype of x."""

    def one(xi, ti):
        f = lambda z: select_output(logit_fn(params, z), ti, output)  # noqa: E731
        g = path_gradients(f, xi, jnp.zeros_like(xi), np.arange(1, steps + 1) / steps)
        return jnp.sqrt(jnp.sum(g.reshape(steps, -1) ** 2, axis=1))

    return jax.vmap(one)(x, target)


@ops.tuned_jit(static_argnames=("logit_fn", "steps", "a"))
def explain_examples(logit_fn, params, x, target, steps: int = 50, a: float = 0.98) -> dict[str, jax.Array]:
    """Figure 4: VG, IG and the three recovered VGs for a few examples (faithful queries)."""

    def one(xi, ti):
        f = lambda z: logit_fn(params, z)[ti]  # noqa: E731
        vg = jax.grad(f)(xi)
        ig = integrated_gradients(f, xi, steps=steps)
        ig_m1 = integrated_gradients(f, ((steps - 1) / steps) * xi, steps=steps - 1)
        ig_a = integrated_gradients(f, a * xi, steps=steps)
        return {"VG": vg, "IG": ig, "A": recover_eq2(ig, xi)[0], "B": recover_eq4(ig, ig_m1, xi, steps)[0],
                "C": recover_eq3(ig, ig_a, xi, a)[0]}

    return jax.vmap(one)(x, target)


# --------------------------------------------------------------------------- running, resuming


def machine_info() -> dict:
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(), "device": str(dev.device_kind),
            "jax_version": jax.__version__, "git_commit": _git_commit()}


def _git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_protocol(
    logit_fn,
    params,
    x: np.ndarray,
    target: np.ndarray,
    cfg: ProtocolConfig,
    *,
    chunk_size: int = 16,
    partial_path: Path | None = None,
    progress: bool = True,
    desc: str = "",
    shard: bool = True,
    chunk_fn=None,
    tag: str = "",
    multihost: bool = True,
) -> tuple[dict[str, np.ndarray], float]:
    """Run the protocol over ``x[N, ...]`` in chunks, resuming from ``partial_path``.

    After every chunk the distances so far are saved to ``partial_path``
    (atomically, with a fingerprint of the inputs and config), so an
    interrupted run continues where it stopped. With several local devices
    each chunk is split across them (``shard=True``, data parallel).
    ``chunk_fn(params, xs, ts) -> {experiment: distances}`` replaces
    :func:`protocol_chunk` (the ablations use it; ``tag`` names it in the
    resume fingerprint).

    In a multi-process JAX run (``jax.distributed.initialize``, ``multihost``)
    every process passes the SAME ``x`` and computes a contiguous share of it
    on its local devices, resuming from its own ``partial_path`` (suffixed
    ``.p<i>of<P>``); the shares are all-gathered, so every process returns all
    N distances. All processes must call it together.

    Returns:
      ``({experiment: distances[N] float64}, seconds spent computing)`` (in a
      multi-process run, the slowest process's seconds).
    """
    from tqdm.auto import tqdm

    if multihost and jax.process_count() > 1:
        return _run_protocol_multihost(logit_fn, params, x, target, cfg, chunk_size=chunk_size,
                                       partial_path=partial_path, progress=progress, desc=desc, shard=shard,
                                       chunk_fn=chunk_fn, tag=tag)

    dtype = check_input_dtype(x)
    n = len(x)
    fp = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.asarray(target, np.int64).tobytes()
                        + repr(cfg).encode() + tag.encode()).hexdigest()
    done, seconds, results = 0, 0.0, {e: np.full(n, np.nan) for e in cfg.experiments}
    if partial_path is not None and partial_path.exists():
        try:
            with np.load(partial_path) as z:
                if str(z["fingerprint"]) == fp:
                    done, seconds = int(z["done"]), float(z["seconds"])
                    for e in cfg.experiments:
                        results[e] = z[e].copy()
        except Exception:  # unreadable partial file: start over
            done = 0
    batch_sharding, replicated = data_parallel() if shard else (None, None)
    if replicated is not None:
        params = jax.device_put(params, replicated)
    chunk_size = chunk_length(chunk_size, max(n, chunk_size), batch_sharding)  # fixed size: resumes compile once
    micro = None
    if chunk_fn is None and batch_sharding is None and n:  # CPU: a loop over micro-batches inside each chunk
        micro = auto_micro_batch(logit_fn, params, jnp.asarray(x[0], dtype), cfg.evaluations_per_image)
    bar = tqdm(total=n, initial=done, desc=desc or "protocol", disable=not progress, unit="img")
    while done < n:
        s, e_ = done, min(done + chunk_size, n)
        xs, ts = pad_chunk([jnp.asarray(x[s:e_], dtype), jnp.asarray(target[s:e_], jnp.int32)], chunk_size,
                           batch_sharding)
        t0 = time.perf_counter()
        if chunk_fn is None:
            out = jax.device_get(protocol_chunk(logit_fn, params, xs, ts, cfg, micro))
        else:
            out = jax.device_get(chunk_fn(params, xs, ts))
        seconds += time.perf_counter() - t0
        for k, v in out.items():
            results[k][s:e_] = np.asarray(v, np.float64)[: e_ - s]
        done = e_
        bar.update(e_ - s)
        if partial_path is not None:
            atomic_save_npz(partial_path, fingerprint=fp, done=done, seconds=seconds, **results)
    bar.close()
    return results, seconds


def _run_protocol_multihost(logit_fn, params, x, target, cfg, *, partial_path, **kwargs):
    """:func:`run_protocol` of this process's contiguous share, all-gathered across processes."""
    from jax.experimental import multihost_utils

    n, count, me = len(x), jax.process_count(), jax.process_index()
    bounds = [n * i // count for i in range(count + 1)]
    lo, hi = bounds[me], bounds[me + 1]
    mine = None if partial_path is None else Path(f"{partial_path}.p{me}of{count}")
    local, seconds = run_protocol(logit_fn, params, x[lo:hi], target[lo:hi], cfg, partial_path=mine,
                                  multihost=False, **kwargs)
    width = max(b - a for a, b in zip(bounds, bounds[1:]))

    def gather(values: np.ndarray) -> np.ndarray:  # float64 bits as uint32 pairs: exact even with x64 off
        bits = np.ascontiguousarray(values, np.float64).view(np.uint32)
        out = np.asarray(multihost_utils.process_allgather(bits), np.uint32)
        return np.ascontiguousarray(out).view(np.float64)  # (processes, len(values))

    results = {}
    for e in cfg.experiments:
        padded = np.full(width, np.nan)
        padded[: hi - lo] = local[e]
        gathered = gather(padded)
        results[e] = np.concatenate([gathered[i, : bounds[i + 1] - bounds[i]] for i in range(count)])
    return results, float(np.max(gather(np.asarray([seconds]))))


def summarize_results(results: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: summarize(v) for k, v in results.items()}


# --------------------------------------------------------------------------- ablation: BatchNorm on batch statistics


def make_batchstats_logit_fn(model):
    """``logits_fn(variables, x[B, ...]) -> [B, C]`` with BatchNorm on the statistics of the batch ``x``.

    This is a PyTorch model left in ``train()`` mode: each example's logits
    depend on the whole batch. Only the ablation below uses it.
    """

    def logits_fn(variables, xb):
        out, _ = model.apply(variables, xb, train=True, mutable=["batch_stats"])
        return out

    return logits_fn


@ops.tuned_jit(static_argnames=("logits_fn", "steps", "a"))
def batchstats_protocol_chunk(logits_fn, params, x, target, steps: int = 50, a: float = 0.98):
    """Table 1 and Experiments B, C with BatchNorm on batch statistics, as Captum would compute them.

    Captum evaluates the ``m`` path points of one image as ONE batch and
    differentiates the sum of their target outputs; in train mode the batch
    statistics couple the points. VG is the gradient with the chunk ``x`` of
    test images as the batch. Returns ``{experiment: distances[N]}`` and the
    path-gradient norms ``[N, m]`` (Figure 5 under batch statistics).
    """
    m = steps

    def ig_batch(xi, ti, scale, n):
        nodes = jnp.asarray(np.arange(1, n + 1) / n, xi.dtype)
        xq = jnp.asarray(scale, xi.dtype) * xi
        pts = nodes[:, None, None, None] * xq[None]
        grads = jax.grad(lambda p: jnp.sum(logits_fn(params, p)[:, ti]))(pts)
        return xq * jnp.mean(grads, axis=0), jnp.sqrt(jnp.sum(grads.reshape(n, -1) ** 2, axis=1))

    vg = jax.grad(lambda xb: jnp.sum(jnp.take_along_axis(logits_fn(params, xb), target[:, None], axis=1)))(x)

    def one(xi, ti, vgi):
        ig_m, norms = ig_batch(xi, ti, 1.0, m)
        ig_m1, _ = ig_batch(xi, ti, (m - 1) / m, m - 1)
        ig_a, _ = ig_batch(xi, ti, a, m)
        rb, mb = recover_eq4(ig_m, ig_m1, xi, m)
        rc, mc = recover_eq3(ig_m, ig_a, xi, a)
        return {"table1": _dist(vgi[None], ig_m[None])[0], "B": _dist(vgi[None], rb[None], mb[None])[0],
                "C": _dist(vgi[None], rc[None], mc[None])[0]}, norms

    return jax.vmap(one)(x, target, vg)
