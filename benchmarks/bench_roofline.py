"""IG against the machine's own limit, and against Captum in interleaved rounds (docs/PERFORMANCE.md, issue 18).

For each model and dtype, on N images with m steps (riemann_right, logit of the label, random-init weights):

1. The attainable rate of this machine, measured in the same run: the best of several large square matmuls
   through XLA (GFLOP/s, ``2 n^3`` FLOPs each), per dtype.
2. The FLOPs of one explanation: XLA's own count (``compiled.cost_analysis()["flops"]``) of the compiled IG
   chunk the engine runs, divided by the chunk's examples (forward, input gradient and the weighting - what XLA
   executes, not a hand count).
3. IG's throughput as a fraction of the roofline: ``(expl/s x FLOPs/expl) / attainable GFLOP/s``.
4. Ours against Captum (``IntegratedGradients``, riemann_right) at Captum's BEST internal batch: each size of
   ``--captum-sweep`` (points per internal batch) is timed once and the fastest kept (``--captum-batch B``
   fixes it instead); then ``--rounds`` interleaved rounds (ours, Captum, ours, Captum, ...), each ratio the
   median of the per-round ratios, printed with its min-max.

Usage: python benchmarks/bench_roofline.py [--models lenet,resnet18] [--dtypes float32,float64] [--n 64]
                                           [--steps 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrecover import ops  # noqa: E402
from jaxrecover.engine import auto_chunk_size, auto_micro_batch, explain  # noqa: E402
from jaxrecover.engine.batch import _explain_chunk  # noqa: E402
from jaxrecover.explainers import IG  # noqa: E402
from jaxrecover.models import cast_variables, init_variables, make_model  # noqa: E402


def attainable_gflops(dtype, sizes=(1024, 2048, 3072), repeats=3) -> tuple[float, int]:
    """The best GFLOP/s of a square matmul through XLA (tuned CPU options, as the engine compiles), and its size."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
        b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
        mm = ops.tuned_jit(lambda p, q: p @ q)
        jax.block_until_ready(mm(a, b))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(mm(a, b))
            rate = 2 * n**3 / (time.perf_counter() - t0) / 1e9
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def flops_per_explanation(f, v, x, y, steps) -> float:
    """XLA's FLOP count of one explanation compiled without the micro-batch loop (XLA counts a loop's body once,
    not once per trip)."""
    xs, ys = x[:1], y[:1]
    compiled = _explain_chunk.lower(IG(steps=steps), f, v, xs, ys, jnp.zeros_like(xs), output="logit",
                                    micro_batch=None).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,resnet18")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--captum-batch", type=int, default=None,
                    help="Captum's internal batch in points (default: the fastest of --captum-sweep)")
    ap.add_argument("--captum-sweep", default=None,
                    help="internal batch sizes (points) tried for Captum's best, comma-separated "
                         "(default: N, 4N, 16N and N x m; Captum takes at least N)")
    a = ap.parse_args(argv)
    import torch
    from captum.attr import IntegratedGradients

    from jaxrecover.models.torch_twins import to_nchw, torch_twin

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
          f"JAX {jax.__version__} ({jax.default_backend()}); N={a.n}, m={a.steps}, {a.rounds} interleaved rounds; "
          f"command: python benchmarks/bench_roofline.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    peaks = {}
    for dt in a.dtypes.split(","):
        peaks[dt] = attainable_gflops(jnp.dtype(dt))
        print(f"attainable {dt}: {peaks[dt][0]:.1f} GFLOP/s (XLA matmul {peaks[dt][1]}^2)")
    print("\n| model | dtype | GFLOP / expl (XLA count) | ours expl/s | ours GFLOP/s | fraction of roofline | "
          "Captum expl/s (best internal batch) | ours / Captum, median (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in a.models.split(","):
        f = make_model(name)
        v32 = init_variables(name, jax.random.key(0), jnp.float32)
        for dt in a.dtypes.split(","):
            v = cast_variables(v32, dt)
            x = jnp.asarray(rng.standard_normal((a.n, 28, 28, 1)), dt)
            y = jnp.asarray(rng.integers(0, 10, a.n), jnp.int32)
            micro = auto_micro_batch(f, v, x[0], a.steps)
            chunk = auto_chunk_size(f, v, x[0], a.steps, a.n, micro_batch=micro)
            flops = flops_per_explanation(f, v, x, y, a.steps)
            tdt = torch.float64 if dt == "float64" else torch.float32
            twin = torch_twin(name, jax.device_get(v), tdt)
            xt = torch.from_numpy(np.array(to_nchw(np.asarray(x)))).to(tdt)
            yt = torch.from_numpy(np.array(y)).long()
            ig = IntegratedGradients(twin)

            def ours():
                jax.block_until_ready(explain(IG(steps=a.steps), f, v, x, y, chunk_size=chunk))

            def captum(batch):
                ig.attribute(xt, baselines=torch.zeros_like(xt), target=yt, n_steps=a.steps, method="riemann_right",
                             internal_batch_size=batch)

            ours()  # compile / warm up
            if a.captum_batch:
                batch = a.captum_batch
                captum(batch)
            else:  # Captum's best internal batch: each size timed once after a warm-up call
                sizes = ([int(s) for s in a.captum_sweep.split(",")] if a.captum_sweep
                         else sorted({a.n, 4 * a.n, 16 * a.n, a.n * a.steps}))
                captum(sizes[0])
                swept = {}
                for b in sizes:
                    t0 = time.perf_counter()
                    captum(b)
                    swept[b] = time.perf_counter() - t0
                batch = min(swept, key=swept.get)
            t_ours, t_captum = [], []
            for _ in range(a.rounds):
                for fn, ts in ((ours, t_ours), (lambda: captum(batch), t_captum)):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
            ratios = [c / o for o, c in zip(t_ours, t_captum)]
            per_s = a.n / statistics.median(t_ours)
            gflops = per_s * flops / 1e9
            print(f"| {name} | {dt} | {flops / 1e9:.2f} | {per_s:.1f} | {gflops:.0f} | {gflops / peaks[dt][0]:.0%} | "
                  f"{a.n / statistics.median(t_captum):.1f} ({batch}) | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
