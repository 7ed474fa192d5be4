"""Why IG loops over micro-batches on the CPU: per-point cost of one batched gradient call vs its batch size.

For LeNet and ResNet18 (float32, random weights) it times ONE jitted call
computing the input gradients of B points (``ops.tuned_jit``, the options IG
uses) and prints, per B: microseconds per point, XLA's temporary buffer of the
call (MiB) and the minor page faults per call (``getrusage``). Then IG of N
images (m = 50) with ``micro_batch=None`` (one vmap per chunk) and with the
default ``"auto"`` (a ``lax.map`` over micro-batches inside the call).

Usage: python benchmarks/bench_batch.py [--points 50 100 200 800] [--n 32] [--smoke]
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from jaxrecover.engine import auto_micro_batch, explain
from jaxrecover.explainers import IG
from jaxrecover import ops
from jaxrecover.models import init_variables, make_model


def _best(fn, repeats):
    jax.block_until_ready(fn())
    best, faults = float("inf"), 0
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return best, faults / repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet", "resnet18"])
    p.add_argument("--points", type=int, nargs="+", default=[50, 100, 200, 800])
    p.add_argument("--n", type=int, default=32, help="images for the IG rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.models, a.points, a.n, a.repeats = ["lenet"], [4, 8], 2, 1
    steps = 4 if a.smoke else 50
    print(f"JAX {jax.__version__} ({jax.default_backend()}), float32, best of {a.repeats}\n")
    print("| model | gradient points per call | us / point | XLA temp (MiB) | minor page faults / call |")
    print("|---|---|---|---|---|")
    ig_rows = []
    for name in a.models:
        f = make_model(name)
        v = init_variables(name, jax.random.key(0), jnp.float32)
        grads = ops.tuned_jit(lambda v, pts: jax.vmap(jax.grad(lambda z: f(v, z)[3]))(pts))
        for b in a.points:
            pts = jax.random.uniform(jax.random.key(1), (b, 28, 28, 1), jnp.float32)
            t, faults = _best(lambda: grads(v, pts), a.repeats)
            temp = grads.lower(v, pts).compile().memory_analysis().temp_size_in_bytes / 2**20
            print(f"| {name} | {b} | {t / b * 1e6:.0f} | {temp:.1f} | {faults:.0f} |")
        x = jax.random.uniform(jax.random.key(2), (a.n, 28, 28, 1), jnp.float32)
        y = jnp.arange(a.n) % 10
        for micro in (None, "auto"):
            t, faults = _best(lambda: explain(IG(steps=steps), f, v, x, y, chunk_size=a.n, micro_batch=micro), a.repeats)
            shown = auto_micro_batch(f, v, x[0], steps) if micro == "auto" else None
            ig_rows.append((name, a.n, shown, a.n / t, faults))
    print("\n| model | chunk (images) | micro-batch (images) | IG expl/s | minor page faults / call |")
    print("|---|---|---|---|---|")
    for name, n, micro, rate, faults in ig_rows:
        print(f"| {name} | {n} | {micro or '- (one vmap)'} | {rate:.1f} | {faults:.0f} |")


if __name__ == "__main__":
    main()
