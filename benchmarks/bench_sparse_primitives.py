"""Is an exact "less arithmetic" IG for LeNet worth it on XLA:CPU? The primitives it needs, timed.

LeNet's IG spends most of its time in conv2 and its input gradient at the m path points
(docs/PERFORMANCE.md, section 8). The first-layer units switch at most once along the path, so
``sum_k w_k relu'_k * conv2^T(delta_k)`` equals ONE transposed convolution of ``sum_k w_k delta_k``
plus, for each switching unit, a 3x3x64 dot product with a prefix sum of the ``w_k delta_k`` (and the
forward likewise: two convolutions plus scattered corrections). That replaces 50 convolutions by one
plus E gathered (or scattered) patches and a prefix sum over the points. This script times those
pieces for LeNet's shapes so the trade can be read off: 50 transposed convolutions against one, a
gather of E patches, a scatter of E x 9 updates, a prefix sum over the 50 points (XLA's cumsum and an
unrolled loop) and the compaction of the switching units (``jnp.nonzero`` with a static size).

Usage:  python benchmarks/bench_sparse_primitives.py [--switching 4096] [--dtypes float32,float64] [--repeats 5]
Prints a markdown table (median ms of ``--repeats`` calls after one warm-up, per example).
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

N_POINTS, H, C, O, K = 50, 26, 32, 64, 3  # LeNet: conv2 takes 26x26x32 to 24x24x64 with 3x3 kernels
HO = H - K + 1


def _conv(h, w):
    return ops.conv_general_dilated(h[None], w, (1, 1), ((0, 0), (0, 0)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]


def pieces(dtype, e):
    """``{name: (function, args)}`` for one example."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((K, K, C, O)), dtype)
    g = jnp.asarray(rng.standard_normal((N_POINTS, HO, HO, O)), dtype)
    j = jnp.asarray(rng.integers(0, N_POINTS, e))
    yy, xx = (jnp.asarray(rng.integers(0, H, e)) for _ in range(2))
    cc = jnp.asarray(rng.integers(0, C, e))
    vals = jnp.asarray(rng.standard_normal((e, 2)), dtype)
    states = jnp.asarray(rng.integers(0, N_POINTS + 1, (H, H, C)))
    h0 = jnp.zeros((H, H, C), dtype)

    def conv_t_all(g):
        return jax.vmap(lambda gk: jax.vjp(lambda h: _conv(h, w), h0)[1](gk)[0])(g)

    def conv_t_one(g):
        return jax.vjp(lambda h: _conv(h, w), h0)[1](jnp.sum(g, 0))[0]

    def offsets():
        dy = jnp.arange(K)[None, :, None]
        dx = jnp.arange(K)[None, None, :]
        return yy[:, None, None] - dy + K - 1, xx[:, None, None] - dx + K - 1

    def gather(g):
        oy, ox = offsets()
        padded = jnp.pad(g, ((0, 0), (K - 1, K - 1), (K - 1, K - 1), (0, 0)))
        patches = padded[j[:, None, None], oy, ox]
        return jnp.einsum("ekwo,kweo->e", patches, w[:, :, cc, :])

    def scatter(vals):
        oy, ox = offsets()
        shape = (e, K, K)
        upd = vals[:, None, None, :, None] * jnp.moveaxis(w[:, :, cc, :], 2, 0)[:, :, :, None, :]
        buf = jnp.zeros((N_POINTS, HO + 2 * (K - 1), HO + 2 * (K - 1), 2, O), dtype)
        return buf.at[jnp.broadcast_to(j[:, None, None], shape), jnp.broadcast_to(oy, shape),
                      jnp.broadcast_to(ox, shape)].add(upd)

    def cumsum_xla(g):
        return jnp.cumsum(g, axis=0)

    def cumsum_loop(g):
        out = [g[0]]
        for k in range(1, g.shape[0]):
            out.append(out[-1] + g[k])
        return jnp.stack(out)

    def compact(states):
        return jnp.nonzero(states < N_POINTS, size=e, fill_value=0)

    # the identity the idea rests on: a gathered patch dot equals the transposed convolution at that unit
    dense = conv_t_all(g)[j, yy, xx, cc]
    err = float(jnp.max(jnp.abs(gather(g) - dense)) / jnp.max(jnp.abs(dense)))
    if err > (1e-12 if dtype == jnp.float64 else 1e-5):
        raise SystemExit(f"gathered patches disagree with the transposed convolution: relative error {err:.2e}")
    return {"50 transposed convs (today's backward)": (conv_t_all, (g,)),
            "1 transposed conv of the weighted sum": (conv_t_one, (g,)),
            f"gather {e} patches + dot": (gather, (g,)),
            f"scatter {e} x 9 updates (forward)": (scatter, (vals,)),
            "prefix sum over 50 points (jnp.cumsum)": (cumsum_xla, (g,)),
            "prefix sum over 50 points (unrolled adds)": (cumsum_loop, (g,)),
            f"compact switching units (nonzero, size {e})": (compact, (states,))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switching", type=int, default=4096, help="switching first-layer units per example (E)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()}); "
          f"command: python benchmarks/bench_sparse_primitives.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    dtypes = a.dtypes.split(",")
    print("| piece (one example, LeNet conv2) | " + " | ".join(f"{d} ms" for d in dtypes) + " |")
    print("|---|" + "---|" * len(dtypes))
    table: dict[str, list[str]] = {}
    for dt in dtypes:
        for name, (fn, args) in pieces(jnp.dtype(dt), a.switching).items():
            f = ops.tuned_jit(fn)
            jax.block_until_ready(f(*args))
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append(time.perf_counter() - t0)
            table.setdefault(name, []).append(f"{statistics.median(ts) * 1e3:.2f}")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
