"""lax vs jaxrecover.ops on the paper's layer shapes: prints a Markdown table (docs/PERFORMANCE.md).

Times the forward pass and the input gradient of each convolution and max-pool
shape of LeNet and ResNet18 for a batch of B path points, with XLA's lowering
(``lax.conv_general_dilated`` / ``flax.linen.max_pool``) and with the exact
reformulations of ``jaxrecover.ops``.

Usage: python benchmarks/bench_ops.py [--batch 800] [--dtypes float32 float64] [--smoke]
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from jaxrecover import ops  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
# name, input (H, C), kernel, stride, padding, output channels
CONVS = [
    ("lenet conv1", (28, 1), 3, 1, 0, 32), ("lenet conv2", (26, 32), 3, 1, 0, 64),
    ("resnet conv1 7x7/2", (28, 1), 7, 2, 3, 64), ("resnet layer1 3x3", (7, 64), 3, 1, 1, 64),
    ("resnet layer2 3x3/2", (7, 64), 3, 2, 1, 128), ("resnet layer2 3x3", (4, 128), 3, 1, 1, 128),
    ("resnet layer3 3x3/2", (4, 128), 3, 2, 1, 256), ("resnet layer3 3x3", (2, 256), 3, 1, 1, 256),
    ("resnet layer4 3x3/2", (2, 256), 3, 2, 1, 512), ("resnet layer4 3x3", (1, 512), 3, 1, 1, 512),
]
POOLS = [("lenet maxpool 2x2", (24, 64), (2, 2), (2, 2), ((0, 0), (0, 0))),
         ("resnet maxpool 3x3/2", (14, 64), (3, 3), (2, 2), ((1, 1), (1, 1)))]


def _time(fn, *args, repeats=2):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _pair(f, x):
    y = f(x)
    g = jnp.ones_like(y)
    return ops.tuned_jit(f), ops.tuned_jit(lambda x, g: jax.vjp(f, x)[1](g)[0]), g


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=800)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    convs, pools = (CONVS[:1] + CONVS[-1:], POOLS[:1]) if a.smoke else (CONVS, POOLS)
    batch = 8 if a.smoke else a.batch
    print(f"batch {batch} points, best of 2, ms; JAX {jax.__version__} ({jax.default_backend()})\n")
    print("| layer | dtype | lax fwd | ops fwd | lax grad-input | ops grad-input | speed-up (fwd+grad) |")
    print("|---|---|---|---|---|---|---|")
    for dt in a.dtypes:
        for name, (h, c), k, s, pad, o in convs:
            x = jax.random.normal(jax.random.key(0), (batch, h, h, c), dt)
            w = jax.random.normal(jax.random.key(1), (k, k, c, o), dt)
            padding = ((pad, pad), (pad, pad))
            times = []
            for conv in (lax.conv_general_dilated, ops.conv_general_dilated):
                fw, bw, g = _pair(lambda z, conv=conv: conv(z, w, (s, s), padding, dimension_numbers=DN), x)
                times.append((_time(fw, x), _time(bw, x, g)))
            (lf, lb), (of, ob) = times
            print(f"| {name} | {dt} | {lf:.2f} | {of:.2f} | {lb:.2f} | {ob:.2f} | {(lf + lb) / (of + ob):.1f}x |")
        for name, (h, c), win, st, pad in pools:
            x = jax.random.normal(jax.random.key(0), (batch, h, h, c), dt)
            times = []
            for pool in (nn.max_pool, ops.max_pool):
                fw, bw, g = _pair(lambda z, pool=pool: pool(z, win, st, pad), x)
                times.append((_time(fw, x), _time(bw, x, g)))
            (lf, lb), (of, ob) = times
            print(f"| {name} | {dt} | {lf:.2f} | {of:.2f} | {lb:.2f} | {ob:.2f} | {(lf + lb) / (of + ob):.1f}x |")


if __name__ == "__main__":
    main()
