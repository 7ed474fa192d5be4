"""IG speed and memory benchmark: prints Markdown tables (docs/PERFORMANCE.md).

For each model and dtype, on N images with m steps (riemann_right, logit of the label):

1. IG throughput (explanations/s) of ``jaxrecover.explain(IG(...), ...)`` and its
   ratio to the batched-gradient limit: one jitted call computing the m*N
   gradients of the same path points in a single batch.
2. Captum's ``IntegratedGradients.attribute(method='riemann_right')`` on a
   PyTorch twin with the same weights (``pip install -e '.[bench]'``), the
   throughput ratio, and the largest relative difference of the attributions.
3. The evaluation protocol's cost per image, faithful vs shared mode.
4. XLA's temporary memory of one compiled IG chunk, for several chunk sizes
   (memory is bounded by the chunk, whatever N).

Usage:
    python benchmarks/bench_ig.py                 # full: 5 models, N=64, float32 and float64
    python benchmarks/bench_ig.py --smoke         # seconds: CI's check that it still runs
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxrecover import ops  # noqa: E402
from jaxrecover.engine import auto_chunk_size, auto_micro_batch, explain  # noqa: E402
from jaxrecover.engine.batch import explain_chunk  # noqa: E402
from jaxrecover.explainers import IG  # noqa: E402
from jaxrecover.models import MODEL_NAMES, cast_variables, init_variables, make_model  # noqa: E402
from jaxrecover.protocol import ProtocolConfig, experiments_for, run_protocol  # noqa: E402


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _inputs(n, dtype, seed=0):
    from jaxrecover.data import load_dataset, normalize

    try:
        ds = load_dataset("mnist")
        x, y = normalize(ds.test_images[:n], dtype), ds.test_labels[:n]
    except Exception:  # noqa: BLE001 - benchmark still runs on random data without the dataset
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(n, 28, 28, 1)).astype(dtype), rng.integers(0, 10, n).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _limit_fn(f):
    @ops.tuned_jit  # the same compile options as attribute()
    def grads(v, pts, tt):
        return jax.vmap(jax.grad(lambda z, ti: f(v, z)[ti]))(pts, tt)

    return grads


def _captum(name, variables, x, y, steps, chunk, repeats, sweep):
    """Captum's throughput with ``internal_batch_size = chunk * steps`` and at its best internal batch size."""
    try:
        import torch
        from captum.attr import IntegratedGradients

        from jaxrecover.services.external.torch_twins import from_nchw, to_nchw, torch_twin
    except ImportError:
        return None
    tdtype = torch.float64 if x.dtype == jnp.float64 else torch.float32
    model = torch_twin(name, jax.device_get(variables), tdtype)
    xt = torch.from_numpy(to_nchw(np.asarray(x))).to(tdtype)
    yt = torch.from_numpy(np.asarray(y)).long()
    ig = IntegratedGradients(model)

    def timed(batch, reps):
        def run():
            return ig.attribute(xt, baselines=torch.zeros_like(xt), target=yt, n_steps=steps,
                                method="riemann_right", internal_batch_size=batch)

        out = run()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return best, out

    same = chunk * steps
    t_same, out = timed(same, repeats)
    # Captum's best internal batch (at least N points: Captum raises smaller ones to N)
    batches = sorted({max(b, len(x)) for b in sweep if b != same})
    t_best, best_batch = t_same, same
    for b in batches:
        t, _ = timed(b, 1)
        if t < t_best:
            t_best, best_batch = timed(b, repeats)[0], b
    with torch.no_grad():
        logits_t = model(xt).numpy()
    return t_same, t_best, best_batch, from_nchw(out.detach().numpy()), logits_t


def bench(models, dtypes, n, steps, chunk, repeats, captum, protocol_n, mem_chunks, captum_sweep=(), biases="torch"):
    rows, proto_rows, mem_rows = [], [], []
    for name in models:
        f = make_model(name)
        v32 = init_variables(name, jax.random.key(0), jnp.float32, biases=biases)
        for dt in dtypes:
            v = cast_variables(v32, dt)
            x, y = _inputs(n, np.dtype(dt))
            micro = auto_micro_batch(f, v, x[0], steps)  # attribute's default (a loop on the CPU)
            examples = (auto_chunk_size(f, v, x[0], steps, n, micro_batch=micro) if chunk == "auto" else int(chunk))
            t_ig = _time(lambda: explain(IG(steps=steps), f, v, x, y, chunk_size=examples), repeats)
            nodes = jnp.asarray(np.arange(1, steps + 1) / steps, x.dtype)
            pts = (nodes[:, None, None, None, None] * x[None]).reshape((-1,) + x.shape[1:])
            tt = jnp.tile(y, steps)
            lim = _limit_fn(f)
            t_lim = _time(lambda: lim(v, pts, tt), repeats)
            row = {"model": name, "dtype": dt, "n": n, "chunk": examples, "micro": micro, "ig_per_s": n / t_ig,
                   "limit_per_s": n / t_lim, "ratio_limit": t_lim / t_ig}
            if captum:
                step = min(micro or examples, examples)  # the examples one vmap of ours differentiates at once
                res = _captum(name, v, x, y, steps, step, repeats, captum_sweep)
                if res is not None:
                    t_c, t_cbest, best_batch, attr_c, logits_t = res
                    ours = np.asarray(explain(IG(steps=steps), f, v, x, y, chunk_size=examples))
                    row.update(captum_per_s=n / t_c, ratio_captum=t_c / t_ig, captum_best_per_s=n / t_cbest,
                               captum_best_batch=best_batch, ratio_captum_best=t_cbest / t_ig,
                               max_rel_diff=float(np.abs(ours - attr_c).max() / np.abs(attr_c).max()),
                               logits_rel_diff=float(np.abs(np.asarray(jax.vmap(f, (None, 0))(v, x)) - logits_t).max()
                                                     / np.abs(logits_t).max()))
            rows.append(row)
            if protocol_n:
                xp, yp = np.asarray(x[:protocol_n]), np.asarray(y[:protocol_n])
                for mode in ("faithful", "shared"):
                    cfg = ProtocolConfig(experiments=experiments_for(name), steps=steps, mode=mode)
                    run_protocol(f, v, xp, yp, cfg, chunk_size=min(examples, protocol_n), progress=False)  # compile
                    t0 = time.perf_counter()
                    run_protocol(f, v, xp, yp, cfg, chunk_size=min(examples, protocol_n), progress=False)
                    proto_rows.append({"model": name, "dtype": dt, "mode": mode,
                                       "evals": cfg.evaluations_per_image,
                                       "s_per_img": (time.perf_counter() - t0) / protocol_n})
            if dt == dtypes[0]:
                for c in mem_chunks:
                    xs = jnp.zeros((c, 28, 28, 1), x.dtype)
                    for mb in dict.fromkeys([micro, None]):
                        compiled = explain_chunk.lower(IG(steps=steps), f, v, xs, jnp.zeros(c, jnp.int32), xs,
                                                        output="logit", micro_batch=mb).compile()
                        mem = compiled.memory_analysis()
                        mem_rows.append({"model": name, "dtype": dt, "chunk": c, "micro": mb,
                                         "temp_mib": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20})
    return rows, proto_rows, mem_rows


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_tables(rows, proto_rows, mem_rows, args):
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()}, "
          f"{len(jax.devices())} device(s)); N={args.n}, m={args.steps}, chunk={args.chunk_size}; "
          f"best of {args.repeats}; random-init weights (speed does not depend on training).\n")
    print("| model | dtype | chunk | micro-batch | IG expl/s | limit expl/s | IG / limit | Captum expl/s (same batch) "
          "| IG / Captum | Captum best expl/s (internal batch) | IG / Captum best | max rel diff vs Captum |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = ("-" if r.get("captum_best_per_s") is None
                else f"{r['captum_best_per_s']:.1f} ({r['captum_best_batch']})")
        print(f"| {r['model']} | {r['dtype']} | {r['chunk']} | {r['micro'] or '-'} | {r['ig_per_s']:.1f} "
              f"| {r['limit_per_s']:.1f} "
              f"| {r['ratio_limit']:.2f} | {_fmt(r.get('captum_per_s'))} | {_fmt(r.get('ratio_captum'), '.2f')} "
              f"| {best} | {_fmt(r.get('ratio_captum_best'), '.2f')} | {_fmt(r.get('max_rel_diff'), '.1e')} |")
    if proto_rows:
        print("\n| model | dtype | protocol mode | gradient evals / image | s / image |")
        print("|---|---|---|---|---|")
        for r in proto_rows:
            print(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['evals']} | {r['s_per_img']:.4f} |")
    if mem_rows:
        print("\n| model | dtype | chunk (examples) | micro-batch | XLA temp memory of one IG chunk (MiB) |")
        print("|---|---|---|---|---|")
        for r in mem_rows:
            print(f"| {r['model']} | {r['dtype']} | {r['chunk']} | {r['micro'] or '- (one vmap)'} | {r['temp_mib']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--chunk-size", default="auto", help="examples per IG chunk, or 'auto' (attribute's default)")
    p.add_argument("--captum-sweep", type=int, nargs="*", default=[50, 100, 200, 400, 800, 1600, 3200],
                   help="Captum internal batch sizes tried for its best throughput")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--protocol-n", type=int, default=16, help="images for the protocol cost (0: skip)")
    p.add_argument("--mem-chunks", type=int, nargs="*", default=[8, 32, 128])
    p.add_argument("--no-captum", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds) for CI")
    p.add_argument("--biases", choices=("torch", "zeros"), default="torch",
                   help="random-init biases: PyTorch's default (ReLUs switch along IG's path, as in trained nets) "
                        "or Flax's zeros (every path point has the same gradient; the tables of docs/PERFORMANCE.md "
                        "sections 1-5 were printed that way, before the native sparse path: add JAXRECOVER_NATIVE=0)")
    a = p.parse_args(argv)
    if a.smoke:
        a.models, a.dtypes, a.n, a.steps, a.chunk_size, a.repeats = ["twolayer", "lenet"], ["float32"], 4, 4, 2, 1
        a.protocol_n, a.mem_chunks, a.captum_sweep = 2, [2, 4], [4]
    rows, proto, mem = bench(a.models, a.dtypes, a.n, a.steps, a.chunk_size, a.repeats, not a.no_captum,
                             a.protocol_n, a.mem_chunks, a.captum_sweep, a.biases)
    print_tables(rows, proto, mem, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
