"""IG against the machine's own limit, and against Captum in interleaved rounds (docs/PERFORMANCE.md, issue 18).

For each model and dtype, on N images with m steps (riemann_right, logit of the label, random-init weights
with PyTorch's default biases, ``init_variables(..., biases="torch")``: with Flax's zero biases a ReLU net is
positively homogeneous, every path point has the same gradient and no ReLU switches along the path, which
would flatter the sparse path; ``--biases zeros`` gives that case):

1. The attainable rate of this machine, measured in the same run: the best of several large square matmuls
   through XLA (GFLOP/s, ``2 n^3`` FLOPs each), per dtype.
2. The FLOPs of one explanation, counted from the model: XLA's own count (``compiled.cost_analysis()["flops"]``)
   of the compiled DENSE IG of one image (``IG(sparse_path=False)``: forward and input gradient of the model at
   the m points, and the weighting - plain IG's arithmetic, not a hand count).
3. IG's throughput as a fraction of that roofline: ``(expl/s x FLOPs/expl) / attainable GFLOP/s``, for the
   library's default IG ("ours") and for the dense path. The sparse path (LeNet, ``jaxrecover.native``) does
   fewer operations than plain IG, so its fraction is an EFFECTIVE one (plain IG's FLOPs at the sparse path's
   rate) and may exceed 100 %; the dense path's is the hardware fraction of what it executes.
4. Ours against Captum (``IntegratedGradients``, riemann_right) at Captum's BEST internal batch: each size of
   ``--captum-sweep`` (points per internal batch) is timed once and the fastest kept (``--captum-batch B``
   fixes it instead); then ``--rounds`` interleaved rounds (ours, dense, Captum, ours, dense, Captum, ...), each
   ratio the median of the per-round ratios, printed with its min-max.

Usage: python benchmarks/bench_roofline.py [--models lenet,resnet18] [--dtypes float32,float64] [--n 64]
                                           [--steps 50] [--rounds 5] [--biases torch|zeros]
                                           [--trained checkpoints]

``--trained DIR``: trained weights from ``DIR/<model>`` (``python train.py --model M --out DIR/M``) and the first N
MNIST test images with their labels instead of random weights and random-normal images (how many ReLUs switch
along the path is what the sparse path's speed depends on).
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

from jaxrecover import native, ops  # noqa: E402
from jaxrecover.engine import auto_chunk_size, auto_micro_batch, explain  # noqa: E402
from jaxrecover.engine.batch import explain_chunk  # noqa: E402
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
    """XLA's FLOP count of one DENSE explanation (plain IG's arithmetic), compiled without the micro-batch loop
    (XLA counts a loop's body once, not once per trip)."""
    xs, ys = x[:1], y[:1]
    compiled = explain_chunk.lower(IG(steps=steps, sparse_path=False), f, v, xs, ys, jnp.zeros_like(xs),
                                    output="logit", micro_batch=None).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def relu_switches(f, v, x, steps) -> tuple[float, int, int, int]:
    """Mask changes of the first ReLU layer between consecutive riemann_right path points, per image: (mean, min,
    max, units). The sparse path's work grows with them; zero biases would give none."""
    stem = f.affine_stem.stem
    nodes = jnp.asarray(np.arange(1, steps + 1) / steps, x.dtype).reshape(-1, 1, 1, 1)

    def one(xi):
        s0, sx = stem(v, jnp.zeros_like(xi)), stem(v, xi)
        on = (s0[None] + nodes * (sx - s0)[None]) > 0
        return jnp.sum(on[1:] != on[:-1]), on[0].size

    counts, units = jax.jit(jax.vmap(one))(x)
    counts = np.asarray(counts)
    return float(counts.mean()), int(counts.min()), int(counts.max()), int(units[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,resnet18")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--trained", default=None, metavar="DIR",
                    help="trained checkpoints DIR/<model> and MNIST test images instead of random ones")
    ap.add_argument("--biases", choices=("torch", "zeros"), default="torch",
                    help="random-init biases: PyTorch's default (ReLUs switch along the path) or Flax's zeros")
    ap.add_argument("--captum-batch", type=int, default=None,
                    help="Captum's internal batch in points (default: the fastest of --captum-sweep)")
    ap.add_argument("--captum-sweep", default=None,
                    help="internal batch sizes (points) tried for Captum's best, comma-separated "
                         "(default: N, 4N, 16N and N x m; Captum takes at least N)")
    a = ap.parse_args(argv)
    import torch
    from captum.attr import IntegratedGradients

    from jaxrecover.services.external.torch_twins import to_nchw, torch_twin

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
          f"JAX {jax.__version__} ({jax.default_backend()}); N={a.n}, m={a.steps}, {a.rounds} interleaved rounds; "
          f"{('trained weights from ' + a.trained + '/<model>, MNIST test images') if a.trained else 'biases ' + a.biases}; "
          f"{native.status()}; command: python benchmarks/bench_roofline.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    peaks = {}
    for dt in a.dtypes.split(","):
        peaks[dt] = attainable_gflops(jnp.dtype(dt))
        print(f"attainable {dt}: {peaks[dt][0]:.1f} GFLOP/s (XLA matmul {peaks[dt][1]}^2)")
    print("\n| model | dtype | GFLOP / expl (dense IG, XLA count) | path | ours expl/s | ours GFLOP/s (model FLOPs) | "
          "fraction of roofline | dense path expl/s | dense fraction | Captum expl/s (best internal batch) | "
          "ours / Captum, median (min-max) | dense / Captum, median (min-max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    notes = []
    for name in a.models.split(","):
        f = make_model(name)
        if a.trained:
            import jaxrecover as jr

            _, v32, _ = jr.load_trained(os.path.join(a.trained, name), model=name)
            ds = jr.load_dataset("mnist")
            images, labels = jr.normalize(ds.test_images[:a.n], dtype=np.float64), ds.test_labels[:a.n]
        else:
            v32 = init_variables(name, jax.random.key(0), jnp.float32, biases=a.biases)
            images, labels = rng.standard_normal((a.n, 28, 28, 1)), rng.integers(0, 10, a.n)
        for dt in a.dtypes.split(","):
            v = cast_variables(v32, dt)
            x = jnp.asarray(images, dt)
            y = jnp.asarray(labels, jnp.int32)
            micro = auto_micro_batch(f, v, x[0], a.steps)
            chunk = auto_chunk_size(f, v, x[0], a.steps, a.n, micro_batch=micro)
            flops = flops_per_explanation(f, v, x, y, a.steps)
            tdt = torch.float64 if dt == "float64" else torch.float32
            twin = torch_twin(name, jax.device_get(v), tdt)
            xt = torch.from_numpy(np.array(to_nchw(np.asarray(x)))).to(tdt)
            yt = torch.from_numpy(np.array(y)).long()
            ig = IntegratedGradients(twin)

            sparse = f.relu_conv is not None and native.available()

            def ours():
                jax.block_until_ready(explain(IG(steps=a.steps), f, v, x, y, chunk_size=chunk))

            def dense():
                jax.block_until_ready(explain(IG(steps=a.steps, sparse_path=False), f, v, x, y, chunk_size=chunk))

            def captum(batch):
                ig.attribute(xt, baselines=torch.zeros_like(xt), target=yt, n_steps=a.steps, method="riemann_right",
                             internal_batch_size=batch)

            ours()  # compile / warm up
            if sparse:
                dense()
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
            t_ours, t_dense, t_captum = [], [], []
            runs = ((ours, t_ours),) + (((dense, t_dense),) if sparse else ()) + ((lambda: captum(batch), t_captum),)
            for _ in range(a.rounds):
                for fn, ts in runs:
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
            t_dense = t_dense or t_ours  # no sparse path: the default IG is the dense one

            def ratio(ts):
                r = [c / o for o, c in zip(ts, t_captum)]
                return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"

            def rate(ts):
                per_s = a.n / statistics.median(ts)
                return per_s, per_s * flops / 1e9 / peaks[dt][0]

            (per_s, frac), (dense_s, dense_frac) = rate(t_ours), rate(t_dense)
            print(f"| {name} | {dt} | {flops / 1e9:.2f} | {'sparse' if sparse else 'dense'} | {per_s:.1f} | "
                  f"{per_s * flops / 1e9:.0f} | {frac:.0%}{' (effective)' if sparse else ''} | {dense_s:.1f} | "
                  f"{dense_frac:.0%} | {a.n / statistics.median(t_captum):.1f} ({batch}) | {ratio(t_ours)} | "
                  f"{ratio(t_dense)} |", flush=True)
            if sparse:
                mean, lo, hi, units = relu_switches(f, v, x, a.steps)
                notes.append(f"{name} {dt}: first-layer ReLU switches between consecutive path points, per image: "
                             f"mean {mean:.0f} (min {lo}, max {hi}) of {units} units")
    for line in notes:
        print(f"\n* {line}" if line is notes[0] else f"* {line}")


if __name__ == "__main__":
    main()
