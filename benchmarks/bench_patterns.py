"""PatternNet's costs against VG: fitting the patterns, and explanations per second.

For TwoLayerNet and LeNet (random weights) in float32 and float64, in interleaved rounds (ours first, then
the peer, per round; median and spread printed):
- fit: ``fit_patterns`` over N images (one pass: forward + the layers' running sums) vs ONE plain VG pass
  over the same N images (forward + backward), the cheapest thing that touches every image once;
- explain: PatternAttribution (S_a+-) vs VG vs IG (riemann_right, m = 50), explanations per second through
  ``jr.explain`` on N images.

Usage: python benchmarks/bench_patterns.py [--n 512] [--rounds 5] [--models twolayer,lenet]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jaxrecover as jr
from jaxrecover.explainers import patterns as P

jax.config.update("jax_enable_x64", True)


def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="twolayer,lenet")
    args = ap.parse_args()
    print(f"{jax.devices()[0].device_kind}, N = {args.n}, {args.rounds} interleaved rounds; median (min..max)\n")
    print("| model | dtype | fit patterns (s) | one VG pass (s) | fit / VG | PA expl/s | VG expl/s | IG m=50 expl/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = jr.make_model(name)
        for dtype in (jnp.float32, jnp.float64):
            v = jr.init_variables(name, jax.random.key(0), dtype)
            x = jax.random.normal(jax.random.key(1), (args.n, 28, 28, 1), dtype)
            t = jnp.zeros(args.n, jnp.int32)
            pats = P.fit_patterns(model, v, x, progress=False)  # warm-up (compiles)
            pa = jr.PatternAttribution(pats)
            runs = {"fit": lambda: P.fit_patterns(model, v, x, progress=False),
                    "pa": lambda: jr.explain(pa, model, v, x, t),
                    "vg": lambda: jr.explain(jr.VG(), model, v, x, t),
                    "ig": lambda: jr.explain(jr.IG(steps=50), model, v, x, t)}
            for fn in runs.values():
                timed(fn)
            times = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    times[k].append(timed(fn))

            def med(k, rate=False):
                vals = [args.n / s for s in times[k]] if rate else times[k]
                return f"{statistics.median(vals):.3g} ({min(vals):.3g}..{max(vals):.3g})"

            ratio = statistics.median(a / b for a, b in zip(times["fit"], times["vg"]))
            print(f"| {name} | {jnp.dtype(dtype).name} | {med('fit')} | {med('vg')} | {ratio:.2f} | "
                  f"{med('pa', True)} | {med('vg', True)} | {med('ig', True)} |")


if __name__ == "__main__":
    main()
