"""The paper's evaluation protocol: Table 1 and Experiments A, B, C, and the data of Figures 4 and 5.

For each test image x (explained output: the logit of the true label, x' = 0, m steps, riemann_right):

* ``table1``: distance(VG(x), IG_m(x))                           (every model)
* ``A``: eq. (2), ``nobias_plan(m)``: VG ~ IG_m(x) / x            (no-bias models)
* ``B``: eq. (4), ``paper_plan(m)``: VG ~ m (IG_m(x) - IG_{m-1}((m-1)/m x)) / x   (models with bias)
* ``C``: eq. (3), ``approx_plan(m, a)``: VG ~ (IG_m(x) - IG_m(a x)) / ((1-a) x)   (models with bias)

with the paper's metric (L2 distance of unit-normalised vectors). The queries
are those of the plans in :mod:`jaxrecover.attacks.plans`, answered by the
:class:`jaxrecover.explainers.IG` explainer, and combined by the paper's
closed forms (:func:`jaxrecover.attacks.recover_eq2` ...).

Modes (recorded in every result):

``faithful`` (default)
    Each IG query is computed on its own, from its own input and step count,
    exactly as a service would answer it: 1 + m + (m-1) + m = 150 gradient
    evaluations per image for a model with bias (m = 50), 1 + m for a no-bias one.
``shared``
    Each distinct point ``t (x - b)`` of the queries' paths is differentiated
    once: the points of IG_{m-1}((m-1)/m x) are those of IG_m(x), VG(x) is the
    last of them, and IG_m(a x) shares t = a; 2m - 1 = 99 evaluations. The
    points differ from the faithful ones only by float rounding;
    ``tests/test_protocol.py`` shows the two modes agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import ops
from ..checkpoint import tree_sha256
from ..attacks import (QueryPlan, approx_plan, nobias_plan, paper_plan, query_input, recover_eq2, recover_eq3,
                       recover_eq4)
from ..engine import (allgather_float64, auto_micro_batch, check_input_dtype, chunk_length, data_parallel,
                      map_chunks, process_share, vmap_in_micro_batches)
from ..explainers import IG, VG, integrate, num_evaluations, path_gradients, quadrature, select_output
from ..fileio import atomic_save_npz
from ..metrics import normalized_distance, summarize
from ..models import as_model


__all__ = [
    "PAPER",
    "EXPERIMENTS",
    "RULE",
    "ProtocolConfig",
    "experiments_for",
    "protocol_one",
    "protocol_chunk",
    "run_protocol",
    "path_gradient_norms",
    "explain_examples",
    "summarize_results",
    "protocol_distance",
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
#: The paper's IG rule (its eq. 1).
RULE = "riemann_right"


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
        if unknown or not self.experiments:
            raise ValueError(f"unknown or no experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 2:
            raise ValueError(f"the protocol needs an integer steps >= 2 (eq. 4 asks for m - 1 steps), got {self.steps!r}")
        if "B" in self.experiments and self.steps < 3:
            raise ValueError("Experiment B (eq. 4) needs steps >= 3: IG_{m-1} with m - 1 = 1 step is not a Riemann rule")
        if not (isinstance(self.a, (int, float)) and 0 < self.a < 1):
            raise ValueError(f"a (Experiment C) must lie strictly between 0 and 1, got {self.a!r}")

    def plans(self) -> dict[str, QueryPlan]:
        """The plan of each recovery experiment (A, B, C) of this run."""
        make = {"A": lambda: nobias_plan(RULE, self.steps), "B": lambda: paper_plan(self.steps),
                "C": lambda: approx_plan(RULE, self.steps, self.a)}
        return {e: make[e]() for e in self.experiments if e in make}

    def queries(self) -> list[tuple[float, int]]:
        """The distinct IG queries ``(scale, steps)`` of this run; the first is IG_m(x) (Table 1)."""
        out = [(1.0, self.steps)]
        for plan in self.plans().values():
            out += [(q.scale, q.steps) for q in plan.queries if (q.scale, q.steps) not in out]
        return out

    @property
    def evaluations_per_image(self) -> int:
        """Gradient evaluations one image costs in this mode."""
        if self.mode == "shared":
            return len(_shared_points(self.queries())[0])
        return 1 + sum(num_evaluations(RULE, n) for _, n in self.queries())


def _shared_points(queries) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct path points ``t`` of ``queries`` (with t = 1, VG's) and each query's indices into them."""
    keyed: dict[float, int] = {1.0: 0}
    index = []
    for c, n in queries:
        nodes, _ = quadrature(RULE, n)
        idx = []
        for t in c * nodes:
            key = round(float(t), 12)
            idx.append(keyed.setdefault(key, len(keyed)))
        index.append(np.asarray(idx))
    return np.asarray(list(keyed), np.float64), index


def _metric_dtype(dtype):
    return jnp.float64 if jax.config.jax_enable_x64 else dtype


def protocol_distance(vg, other, mask=None):
    """The paper's distance of one example (no batch axis), in float64 when x64 is on (else the inputs' dtype)."""
    dt = _metric_dtype(vg.dtype)
    return normalized_distance(vg.astype(dt)[None], other.astype(dt)[None], None if mask is None else mask[None])[0]


def protocol_one(model, params, xi, ti, cfg: ProtocolConfig) -> dict[str, jax.Array]:
    """Everything the protocol computes for ONE image: ``VG``, ``IG`` (IG_m) and each experiment's recovered VG.

    Returns ``{"VG", "IG", e, e + "_mask" for e in A/B/C of cfg}``, arrays shaped like ``xi``.
    """
    m = cfg.steps
    queries = cfg.queries()
    if cfg.mode == "faithful":
        vg = VG()(model, params, xi, ti, None, cfg.output)
        answers = {(c, n): IG(steps=n, rule=RULE, factor_stem=False)(model, params, query_input(c, xi), ti, None,
                                                                     cfg.output)
                   for c, n in queries}
    else:
        ts, index = _shared_points(queries)
        f = VG.scalar(model, params, ti, cfg.output)
        g = path_gradients(f, xi, jnp.zeros_like(xi), ts)
        vg = g[0]
        answers = {}
        for (c, n), idx in zip(queries, index):
            answers[(c, n)] = (jnp.asarray(c, xi.dtype) * xi) * integrate(quadrature(RULE, n)[1], g[idx])
    ig_m = answers[(1.0, m)]
    out = {"VG": vg, "IG": ig_m}
    plans = cfg.plans()
    if "A" in plans:
        out["A"], out["A_mask"] = recover_eq2(ig_m, xi)
    if "B" in plans:
        q = plans["B"].queries[1]
        out["B"], out["B_mask"] = recover_eq4(ig_m, answers[(q.scale, q.steps)], xi, m)
    if "C" in plans:
        q = plans["C"].queries[1]
        out["C"], out["C_mask"] = recover_eq3(ig_m, answers[(q.scale, q.steps)], xi, cfg.a)
    return out


@ops.tuned_jit(static_argnames=("model", "cfg", "micro_batch"))
def protocol_chunk(model, params, x, target, cfg: ProtocolConfig, micro_batch: int | None = None
                   ) -> dict[str, jax.Array]:
    """Distances of every experiment for a chunk ``x[N, ...]`` (see the module docstring).

    ``micro_batch``: examples per step of a loop inside the compiled call
    (None: one vmap); see :func:`jaxrecover.engine.auto_micro_batch`.

    Returns:
      ``{experiment: distances[N]}``; distances are computed in float64 when
      x64 is on (whatever the attack's dtype), so the metric adds no float32 floor.
    """

    def one(xi, ti):
        r = protocol_one(model, params, xi, ti, cfg)
        out = {}
        if "table1" in cfg.experiments:
            out["table1"] = protocol_distance(r["VG"], r["IG"])
        for e in ("A", "B", "C"):
            if e in r:
                out[e] = protocol_distance(r["VG"], r[e], r[e + "_mask"])
        return out

    return vmap_in_micro_batches(one, (x, target), micro_batch)


@ops.tuned_jit(static_argnames=("model", "cfg"))
def _examples_chunk(model, params, x, target, cfg):
    return jax.vmap(lambda xi, ti: protocol_one(model, params, xi, ti, cfg))(x, target)


def explain_examples(model, params, x, target, cfg: ProtocolConfig) -> dict[str, jax.Array]:
    """Figure 4: VG, IG_m and each experiment's recovered VG for a few examples ``[k, ...]`` (faithful queries)."""
    cfg = dataclasses.replace(cfg, mode="faithful", experiments=tuple(e for e in cfg.experiments if e != "table1")
                              or ("table1",))
    out = _examples_chunk(as_model(model), params, jnp.asarray(x), jnp.asarray(target, jnp.int32), cfg)
    return {k: v for k, v in out.items() if not k.endswith("_mask")}


@ops.tuned_jit(static_argnames=("model", "steps", "output"))
def _norms_chunk(model, params, x, target, steps, output):
    nodes, _ = quadrature(RULE, steps)

    def one(xi, ti):
        f = lambda z: select_output(model(params, z), ti, output)  # noqa: E731
        g = path_gradients(f, xi, jnp.zeros_like(xi), nodes)
        return jnp.sqrt(jnp.sum(g.reshape(steps, -1) ** 2, axis=1))

    return jax.vmap(one)(x, target)


def path_gradient_norms(model, params, x, target, steps: int = 50, output: str = "logit",
                        chunk_size: int = 4) -> np.ndarray:
    """Figure 5: ``||grad f((i/m) x)||_2`` for i = 1..m, ``[N, m]`` in the dtype of x, in chunks of images.

    Memory is bounded by ``chunk_size`` images x m path points, whatever N.
    """
    model = as_model(model)
    x = jnp.asarray(x)
    check_input_dtype(x)
    target = jnp.asarray(target, jnp.int32)
    return np.asarray(map_chunks(lambda xs, ts: _norms_chunk(model, params, xs, ts, steps, output), (x, target),
                                 chunk_size))


# --------------------------------------------------------------------------- running, resuming


def run_protocol(
    model,
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
    (atomically, with a fingerprint of the weights, inputs, targets and
    config), so an interrupted run continues where it stopped, and a run with
    other weights or settings starts afresh. With several local devices each
    chunk is split across them (``shard=True``, data parallel).
    ``chunk_fn(params, xs, ts) -> {experiment: distances}`` replaces
    :func:`protocol_chunk` (the ablation uses it; ``tag`` names it in the
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
    model = as_model(model)
    if multihost and jax.process_count() > 1:
        return _run_protocol_multihost(model, params, x, target, cfg, chunk_size=chunk_size,
                                       partial_path=partial_path, progress=progress, desc=desc, shard=shard,
                                       chunk_fn=chunk_fn, tag=tag)

    dtype = check_input_dtype(x)
    n = len(x)
    fp = hashlib.sha256(tree_sha256(params).encode() + np.ascontiguousarray(x).tobytes()
                        + np.asarray(target, np.int64).tobytes() + repr(cfg).encode() + tag.encode()).hexdigest()
    done, seconds, results = 0, 0.0, {e: np.full(n, np.nan) for e in cfg.experiments}
    if partial_path is not None and partial_path.exists():
        try:
            with np.load(partial_path) as z:
                if str(z["fingerprint"]) == fp:
                    done, seconds = int(z["done"]), float(z["seconds"])
                    for e in cfg.experiments:
                        results[e] = z[e].copy()
        except Exception:  # noqa: BLE001 - an unreadable partial file: start over
            done = 0
    batch_sharding, replicated = data_parallel() if shard else (None, None)
    if replicated is not None:
        params = jax.device_put(params, replicated)
    chunk_size = chunk_length(chunk_size, max(n, chunk_size), batch_sharding)  # fixed size: resumes compile once
    micro = None
    if chunk_fn is None and batch_sharding is None and n:  # CPU: a loop over micro-batches inside each chunk
        micro = auto_micro_batch(model, params, jnp.asarray(x[0], dtype), cfg.evaluations_per_image)
    xs_all = np.asarray(x, dtype)
    ts_all = np.asarray(target, np.int32)
    clock = [time.perf_counter()]

    def run_chunk(xs, ts):
        if chunk_fn is None:
            return jax.device_get(protocol_chunk(model, params, xs, ts, cfg, micro))
        return jax.device_get(chunk_fn(params, xs, ts))

    def save(lo, hi, out):  # after every chunk: the distances so far, atomically (resume point)
        nonlocal seconds
        now = time.perf_counter()
        seconds += now - clock[0]
        clock[0] = now
        for k, v in out.items():
            results[k][lo:hi] = np.asarray(v, np.float64)
        if partial_path is not None:
            atomic_save_npz(partial_path, fingerprint=fp, done=hi, seconds=seconds, **results)

    if done < n:  # the engine's loop: fixed-size padded chunks (one compilation), sharded, resumable
        map_chunks(run_chunk, (xs_all, ts_all), chunk_size, progress=progress, desc=desc or "protocol",
                   sharding=batch_sharding, start=done, on_chunk=save, keep=False)
    return results, seconds


def _run_protocol_multihost(model, params, x, target, cfg, *, partial_path, **kwargs):
    """:func:`run_protocol` of this process's contiguous share, all-gathered across processes."""
    lo, hi, bounds = process_share(len(x))
    me, count = jax.process_index(), jax.process_count()
    mine = None if partial_path is None else Path(f"{partial_path}.p{me}of{count}")
    local, seconds = run_protocol(model, params, x[lo:hi], target[lo:hi], cfg, partial_path=mine,
                                  multihost=False, **kwargs)
    results = {e: allgather_float64(local[e], bounds) for e in cfg.experiments}
    slowest = allgather_float64(np.asarray([seconds]), list(range(count + 1)))
    return results, float(np.max(slowest))


def summarize_results(results: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean, population variance, median, max per experiment."""
    return {k: summarize(v) for k, v in results.items()}
