"""How many linear-region boundaries the ray from the zero baseline to x crosses: the cost driver of fixed-m recovery.

Usage:  python scripts/ray_breakpoints.py [--n 4] [--grid 20001] [--models twolayer,lenet,resnet18]

Two lower bounds per image (trained checkpoints in checkpoints/<model>):
* first layer, exact: the first affine layer's pre-activations are ``bias + t (stem(x) - bias)`` on the ray, so
  each unit changes sign at most once, at ``t = -bias / (stem(x) - bias)``; the distinct values in (0, 1) are
  boundaries of the activation pattern (every one a gradient jump unless nothing downstream is active);
* all layers, sampled: the gradient changes between consecutive points of a uniform grid of ``--grid`` points
  (changes closer together than the grid spacing count once).
``recover_fixed_steps`` spends about 20-30 queries per jump (docs/SERVICES.md), so these counts bound its cost.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr

jax.config.update("jax_enable_x64", True)


def first_layer_crossings(model, v, x) -> int:
    stem = model.affine_stem.stem
    h0 = np.asarray(stem(v, jnp.zeros_like(x)), np.float64).ravel()   # the biases, per unit
    h1 = np.asarray(stem(v, x), np.float64).ravel()
    slope = h1 - h0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(slope != 0, -h0 / slope, np.nan)
    t = t[(t > 0) & (t < 1)]
    return int(np.unique(np.round(t, 12)).size)


def grid_changes(model, v, x, target, grid: int, chunk: int = 500) -> int:
    g = jax.jit(jax.vmap(jax.grad(lambda z: model(v, z)[target])))
    ts = np.linspace(0.0, 1.0, grid)[1:]
    prev, changes = None, 0
    for k in range(0, ts.size, chunk):
        pts = jnp.asarray(ts[k:k + chunk, None, None, None]) * x[None]
        gs = np.asarray(g(pts)).reshape(pts.shape[0], -1)
        if prev is not None:
            gs = np.concatenate([prev[None], gs])
        d = np.max(np.abs(np.diff(gs, axis=0)), axis=1)
        changes += int(np.sum(d > 1e-12 * np.max(np.abs(gs))))
        prev = gs[-1]
    return changes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--grid", type=int, default=20001)
    ap.add_argument("--models", default="twolayer,lenet,resnet18")
    args = ap.parse_args()
    ds = jr.load_dataset("mnist")
    x = jnp.asarray(jr.normalize(ds.test_images[:args.n], dtype=np.float64))
    print(f"| model | image | first-layer crossings (exact) | gradient changes on a {args.grid}-point grid |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        _, v32, _ = jr.load_trained(f"checkpoints/{name}", model=name)
        v = jr.cast_variables(v32, jnp.float64)
        model = jr.make_model(name)
        for i in range(args.n):
            target = int(ds.test_labels[i])
            print(f"| {name} | {i} | {first_layer_crossings(model, v, x[i])} | "
                  f"{grid_changes(model, v, x[i], target, args.grid)} |", flush=True)


if __name__ == "__main__":
    main()
