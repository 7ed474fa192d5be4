"""How far LeNet's float32 IG is from the float64 one, on the native sparse path and on the dense path.

Usage: python benchmarks/bench_sparse_precision.py [--n 16] [--steps 50] [--checkpoint checkpoints/lenet]

For each case (random weights with PyTorch-default biases on MNIST test images and on N(0, 1) inputs; the
trained checkpoint on MNIST test images when given), IG of the first ``n`` inputs (riemann_right, ``steps``)
in float32 on the sparse path and on the dense path is compared with the dense float64 IG of the same
float32 weights and inputs: per example ``max |a - ref| / max |ref|``, median and worst, and how many examples
are further than 1e-5 (beyond accumulation round-off: a ReLU mask or a max-pool tap decided differently in
float32). It also counts the examples where the two float32 paths disagree with each other beyond 1e-5.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxrecover as jr  # noqa: E402


def _errors(a, ref):
    num = np.abs(np.asarray(a, np.float64) - np.asarray(ref)).reshape(len(ref), -1).max(1)
    return num / np.abs(np.asarray(ref)).reshape(len(ref), -1).max(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="inputs per case (default: 16)")
    p.add_argument("--steps", type=int, default=50, help="IG step count (default: 50)")
    p.add_argument("--checkpoint", default=None, help="a trained LeNet checkpoint for a third case (default: none)")
    a = p.parse_args(argv)
    if not jr.native.available():
        print(f"the native sparse path is not available here: {jr.native.status()}")
        return 1
    model = jr.make_model("lenet")
    ds = jr.load_dataset("mnist")
    mnist = jnp.asarray(jr.normalize(ds.test_images[:a.n], np.float32))
    labels = jnp.asarray(ds.test_labels[:a.n])
    cases = [("random weights, MNIST", jr.init_variables("lenet", jax.random.key(0), jnp.float32, biases="torch"),
              mnist),
             ("random weights, N(0, 1)", jr.init_variables("lenet", jax.random.key(0), jnp.float32, biases="torch"),
              jax.random.normal(jax.random.key(1), mnist.shape, jnp.float32))]
    if a.checkpoint:
        name, v, meta = jr.load_trained(a.checkpoint)
        cases.append((f"trained {meta['state_sha256'][:16]}, MNIST", v, mnist))
    print(f"LeNet IG, riemann_right m={a.steps}, {a.n} inputs per case: float32 against float64 (same weights)\n")
    print("| case | sparse32 median / worst | dense32 median / worst | > 1e-5: sparse32 / dense32 | sparse32 vs dense32 > 1e-5 |")
    print("|---|---|---|---|---|")
    for label, v32, x32 in cases:
        v32 = jr.cast_variables(v32, jnp.float32)
        ref = jr.explain(jr.IG(steps=a.steps, sparse_path=False), model, jr.cast_variables(v32, jnp.float64),
                         x32.astype(jnp.float64), labels)
        sparse = jr.explain(jr.IG(steps=a.steps), model, v32, x32, labels)
        dense = jr.explain(jr.IG(steps=a.steps, sparse_path=False), model, v32, x32, labels)
        es, ed, ex = _errors(sparse, ref), _errors(dense, ref), _errors(sparse, dense.astype(jnp.float64))
        print(f"| {label} | {np.median(es):.1e} / {es.max():.1e} | {np.median(ed):.1e} / {ed.max():.1e} | "
              f"{int((es > 1e-5).sum())} / {int((ed > 1e-5).sum())} of {a.n} | {int((ex > 1e-5).sum())} of {a.n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
