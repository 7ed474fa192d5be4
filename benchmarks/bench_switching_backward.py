"""LeNet's IG with conv2's backward done once (exact "less arithmetic"), against the dense form: tried, not faster.

Along IG's path every first-layer unit of LeNet (conv1, 26x26x32) is affine in t, so its ReLU switches at
most once. IG's backward through conv2 needs ``sum_k w_k m_k * conv2^T(d_k)`` (``d_k``: conv2's output
gradient at point k, ``m_k``: the first-layer ReLU mask); with the mask at the first node this is ONE
transposed convolution of ``sum_k w_k d_k`` plus, for each unit that switches (first at point K), a 3x3x64
dot product of the prefix sum ``sum_{k<K} w_k d_k`` gathered around it. Exact to round-off while the
switching units fit the static capacity (``--capacity``; XLA needs static shapes). Forward unchanged (dense).

This script checks that identity (relative error against the library's IG) and times three versions of the
same explanation in interleaved rounds: the engine's IG (``jr.explain(jr.IG())``, affine stem), the same code
as the switching version with a dense backward, and the switching backward. On this 2-core CPU the switching
backward is not faster (docs/PERFORMANCE.md, section 8): XLA:CPU gathers element by element, and trained
LeNet switches 7,000+ of 21,632 units per MNIST image.

Usage:  python benchmarks/bench_switching_backward.py [--n 4] [--dtype float64] [--capacity 8192] [--rounds 3]
        [--checkpoint checkpoints/lenet | none]   (none: random init with random biases, random-normal inputs)
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

import jaxrecover as jr  # noqa: E402
from jaxrecover import ops  # noqa: E402
from jaxrecover.explainers import path_points, quadrature  # noqa: E402

STEPS = 50


def _conv(h, w):
    return ops.conv_general_dilated(h[None], w, (1, 1), ((0, 0), (0, 0)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]


def _head(p, y2, t):
    """LeNet after conv2's pre-activation output: ReLU, max-pool, fc, ReLU, fc; the target's logit."""
    h = ops.max_pool(jax.nn.relu(y2)[None], (2, 2), strides=(2, 2)).reshape(-1)
    h = jax.nn.relu(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return (h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])[t]


def _stem_and_points(v, x):
    stem = jr.make_model("lenet").affine_stem.stem
    s_x, stem_t = jax.vjp(lambda z: stem(v, z), x)
    z = path_points(s_x, stem(v, jnp.zeros_like(x)), quadrature("riemann_right", STEPS)[0])
    return s_x, stem_t, z


def ig_dense(v, x, t):
    """IG of one example, zero baseline, riemann_right: conv2's backward at every point (the usual way)."""
    p = v["params"]
    _, stem_t, z = _stem_and_points(v, x)
    body = lambda zk: _head(p, _conv(jax.nn.relu(zk), p["Conv_1"]["kernel"]) + p["Conv_1"]["bias"], t)  # noqa: E731
    g = jax.vmap(jax.grad(body))(z)
    (total,) = stem_t(jnp.tensordot(jnp.asarray(quadrature("riemann_right", STEPS)[1], x.dtype), g, axes=1))
    return x * total, jnp.int32(0)


def ig_switching(v, x, t, capacity):
    """The same IG with ONE transposed conv2 plus gathered corrections for the switching units; also their count."""
    p = v["params"]
    w2 = p["Conv_1"]["kernel"]
    kh, kw = w2.shape[:2]
    s_x, stem_t, z = _stem_and_points(v, x)
    mask = z > 0
    y2 = jax.vmap(lambda zk: _conv(jax.nn.relu(zk), w2))(z) + p["Conv_1"]["bias"]
    d2 = jax.vmap(jax.grad(_head, argnums=1), in_axes=(None, 0, None))(p, y2, t)
    wd = jnp.asarray(quadrature("riemann_right", STEPS)[1], x.dtype)[:, None, None, None] * d2
    prefix = [wd[0]]
    for k in range(1, STEPS):  # unrolled: XLA:CPU's cumsum is a slow reduce-window
        prefix.append(prefix[-1] + wd[k])
    full = prefix[-1]
    prefix = jnp.stack(prefix)  # prefix[k] = sum_{i <= k} w_i d_i
    (g_full,) = jax.vjp(lambda h: _conv(h, w2), s_x)[1](full)
    switching = mask[0] != mask[-1]
    first = jnp.sum(mask == mask[0][None], axis=0)  # the first point whose mask differs (masks are monotone)
    yy, xx, cc = jnp.nonzero(switching, size=capacity, fill_value=0)
    valid = jnp.arange(capacity) < jnp.sum(switching)
    oy = yy[:, None, None] - jnp.arange(kh)[None, :, None] + kh - 1
    ox = xx[:, None, None] - jnp.arange(kw)[None, None, :] + kw - 1
    padded = jnp.pad(prefix, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    patches = padded[(first[yy, xx, cc] - 1)[:, None, None], oy, ox]
    g_before = jnp.einsum("ekwo,kweo->e", patches, w2[:, :, cc, :])  # (conv2^T prefix[K-1]) at each unit
    sign = jnp.where(mask[0][yy, xx, cc], -1, 1).astype(x.dtype)
    fix = jnp.where(valid, sign * (g_full[yy, xx, cc] - g_before), 0)
    (total,) = stem_t(jnp.where(mask[0], g_full, 0).at[yy, xx, cc].add(fix))
    return x * total, jnp.sum(switching)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--capacity", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", default="checkpoints/lenet")
    a = ap.parse_args(argv)
    dt = jnp.dtype(a.dtype)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()}); "
          f"command: python benchmarks/bench_switching_backward.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    if a.checkpoint != "none":
        _, v32, _ = jr.load_trained(a.checkpoint, model="lenet")
        ds = jr.load_dataset("mnist")
        x = jnp.asarray(jr.normalize(ds.test_images[:a.n], dtype=np.dtype(dt)))
        y = jnp.asarray(ds.test_labels[:a.n])
    else:
        init = jr.init_variables("lenet", jax.random.key(0), jnp.float32)
        keys = iter(jax.random.split(jax.random.key(1), 8))
        v32 = jax.tree_util.tree_map_with_path(
            lambda path, leaf: leaf + 0.1 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
            if getattr(path[-1], "key", "") == "bias" else leaf, init)
        x = jax.random.normal(jax.random.key(2), (a.n, 28, 28, 1), dt)
        y = jnp.arange(a.n) % 10
    v = jr.cast_variables(v32, dt)
    model = jr.make_model("lenet")
    dense = ops.tuned_jit(jax.vmap(ig_dense, in_axes=(None, 0, 0)))
    switching = ops.tuned_jit(jax.vmap(lambda v, x, t: ig_switching(v, x, t, a.capacity), in_axes=(None, 0, 0)))
    ref = jr.explain(jr.IG(steps=STEPS), model, v, x, y)
    out, count = switching(v, x, y)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    count = np.asarray(count)
    print(f"switching first-layer units per image: {count.min()}-{count.max()} of 21632 (capacity {a.capacity}); "
          f"relative error against jr.IG: {err:.2e}" + ("" if count.max() <= a.capacity else " (capacity exceeded)"))
    runs = {"engine IG (jr.explain, affine stem)": lambda: jr.explain(jr.IG(steps=STEPS), model, v, x, y),
            "same code, dense backward": lambda: dense(v, x, y)[0],
            "switching backward": lambda: switching(v, x, y)[0]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        jax.block_until_ready(fn())
    for _ in range(a.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    print(f"\n| version ({a.dtype}, N = {a.n}, m = {STEPS}) | expl/s, median of {a.rounds} interleaved rounds |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {a.n / statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
