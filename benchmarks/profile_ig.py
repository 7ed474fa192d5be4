"""Where IG's time goes: the compiled IG chunk under ``jax.profiler``, its XLA thunks summed by name.

Prints the most expensive fusions/ops of one run of ``explain(IG(...))`` (random-init weights, random-normal
images), each with its total milliseconds, call count and the JAX operation it came from (the HLO metadata),
so a slow lowering (a convolution, a reduction taken by YNNPACK, a select-and-scatter) is named, not guessed.

Weights: random init with PyTorch's default biases (``--biases torch``; zeros make every path point's gradient
the same); ``--dense`` profiles IG without the native sparse path (LeNet).

Usage: python benchmarks/profile_ig.py [--model lenet] [--dtype float64] [--n 8] [--steps 50] [--top 12]
                                       [--biases torch|zeros] [--dense]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrecover.engine import auto_micro_batch, explain  # noqa: E402
from jaxrecover.engine.batch import explain_chunk  # noqa: E402
from jaxrecover.explainers import IG  # noqa: E402
from jaxrecover.models import cast_variables, init_variables, make_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--biases", choices=("torch", "zeros"), default="torch")
    ap.add_argument("--dense", action="store_true", help="IG(sparse_path=False)")
    a = ap.parse_args(argv)
    f = make_model(a.model)
    v = cast_variables(init_variables(a.model, jax.random.key(0), jnp.float32, biases=a.biases), a.dtype)
    ig = IG(steps=a.steps, sparse_path=not a.dense)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.n, 28, 28, 1)), a.dtype)
    y = jnp.asarray(rng.integers(0, 10, a.n), jnp.int32)
    micro = auto_micro_batch(f, v, x[0], a.steps)

    def run():
        return jax.block_until_ready(explain(ig, f, v, x, y, chunk_size=a.n, micro_batch=micro))

    run()  # compile
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]))
    total, calls = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "Pjit", "Common", "Slinky")):
            total[name] += e.get("dur", 0)
            calls[name] += 1
    hlo = explain_chunk.lower(ig, f, v, x, y, jnp.zeros_like(x), output="logit",
                               micro_batch=micro).compile().as_text()
    origin = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
        if m:
            origin[m.group(1)] = (m.group(2), m.group(3).split("/")[-1])
    print(f"{a.model} {a.dtype}: {a.n} images x {a.steps} points, micro-batch {micro}, wall {wall * 1e3:.0f} ms "
          f"({a.n / wall:.1f} expl/s, under the profiler)\n")
    print("| thunk | ms | calls | share of wall | shape | from |")
    print("|---|---|---|---|---|---|")
    for name, us in total.most_common(a.top):
        shape, op = origin.get(name, ("", ""))
        print(f"| {name} | {us / 1e3:.1f} | {calls[name]} | {us / 1e6 / wall:.0%} | {shape} | {op} |")


if __name__ == "__main__":
    main()
