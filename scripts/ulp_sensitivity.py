"""Why no attack on Captum's riemann_middle (zero baseline) reaches round-off on max-pool nets: the twin's VG
changes within one float64 ulp of ``x`` (docs/SERVICES.md, "Which VG is the truth" and "Recovery, measured").

Usage:  python scripts/ulp_sensitivity.py [--models lenet,resnet18] [--n 16] [--random]

Prints, per model (trained ``checkpoints/<model>``, or random-init weights with ``--random``), float64:

1. Ties broken by round-off: the twin's first convolution applied to CONSTANT images (the MNIST background value
   and a few of its scalings); for each, how many output channels hold more than one distinct value over the
   positions where every input is the same (exact arithmetic gives one value per channel). Which channels split
   changes with the constant, so max-pool's choice among tied windows depends on the rounding of the input.
2. The gradient one ulp away: for the first N test images, the paper's distance between the twin's autograd VG at
   ``x`` and at ``x`` with every pixel moved by one float64 ulp (towards zero, then away from zero), and the same
   for the JAX model (XLA computes the tied windows identically, so its VG should move by round-off only).
3. The point Captum evaluates instead of ``x``: the plan ``jr.best_plan`` picks for Captum riemann_middle shares its
   points only to float32 round-off and its largest point is ``fl(a c x)`` with float32 node ``a`` and scale ``c``,
   never ``x`` itself (on-ray proof in SERVICES.md); the distance between the twin's VG at ``x`` and at that point.

A plan whose answers combine gradients at points other than ``x`` cannot return the twin's VG at ``x`` closer than
these distances, however exact its algebra.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover.services.external import CaptumIGService, require_extra
from jaxrecover.metrics import normalized_distance

jax.config.update("jax_enable_x64", True)


def split_channels(twin, torch, value: float) -> int:
    """Channels of the twin's first conv whose outputs on a constant image are not all one float64 value."""
    conv = next(m for m in twin.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        out = conv(torch.full((1, conv.in_channels, 28, 28), value, dtype=torch.float64))[0]
    k = conv.padding[0]   # outputs whose window lies inside the image (no padded input)
    inner = out[:, k:out.shape[1] - k, k:out.shape[2] - k] if k else out
    return int(sum(len(torch.unique(inner[c])) > 1 for c in range(inner.shape[0])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,resnet18")
    ap.add_argument("--n", type=int, default=16, help="first N MNIST test images")
    ap.add_argument("--random", action="store_true", help="random-init weights instead of checkpoints/<model>")
    args = ap.parse_args()
    torch = require_extra("torch")
    ds = jr.load_dataset("mnist")
    x = jnp.asarray(jr.normalize(ds.test_images[:args.n], dtype=np.float64))
    y = jnp.asarray(ds.test_labels[:args.n])
    down = jnp.nextafter(x, jnp.zeros_like(x))
    up = jnp.nextafter(x, jnp.sign(x) * jnp.inf)
    background = float(np.ravel(jr.normalize(np.zeros((1, 1), np.uint8), dtype=np.float64))[0])
    rows = []
    for name in args.models.split(","):
        if args.random:
            v = jr.cast_variables(jr.init_variables(name, jax.random.PRNGKey(0)), jnp.float64)
            source = "random init (seed 0)"
        else:
            _, v32, meta = jr.load_trained(f"checkpoints/{name}", model=name)
            v = jr.cast_variables(v32, jnp.float64)
            source = f"{meta['epochs']} epochs, test acc {100 * meta['test_accuracy']:.2f} %"
        svc = CaptumIGService(name, v, rule="riemann_middle")
        consts = [background * s for s in (1.0, 0.75, 0.5, 0.3, 1.0 + 2**-40)]
        split = [split_channels(svc.twin, torch, c) for c in consts]
        vg = svc.gradient(x, y)
        d_down = normalized_distance(vg, svc.gradient(down, y))
        d_up = normalized_distance(vg, svc.gradient(up, y))
        model = jr.make_model(name)
        jvg = jr.explain(jr.VG(), model, v, x, y)
        j_down = normalized_distance(jvg, jr.explain(jr.VG(), model, v, down, y))
        plan = jr.best_plan(svc)
        q = max(plan.queries, key=lambda q: q.scale)
        nodes, _ = svc.quadrature(q.steps)
        top = (q.scale * x) * nodes[-1]     # Captum: baseline + alpha * (input - baseline), zero baseline
        d_top = normalized_distance(vg, svc.gradient(top, y))
        bitwise = int(jnp.sum(jnp.all((top == x).reshape(args.n, -1), axis=1)))
        rows.append((name, source, split, len(consts), d_down, d_up, j_down, plan.name, q, nodes[-1], d_top, bitwise))
    print(f"float64, first {args.n} MNIST test images; distances are the paper's (mean / max over images)\n")
    print("| model | weights | channels split by round-off on constant images (of the first conv's) | twin VG: x vs "
          "1 ulp down | twin VG: x vs 1 ulp up | JAX VG: x vs 1 ulp down | riemann_middle plan, its largest "
          "point | twin VG: x vs that point | images where that point is x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, source, split, nc, dd, du, jd, pname, q, a, dt, bw in rows:
        f = lambda d: f"{float(d.mean()):.1e} / {float(d.max()):.1e}"  # noqa: E731
        print(f"| {name} | {source} | {', '.join(map(str, split))} (of {nc} constants) | {f(dd)} | {f(du)} | "
              f"{f(jd)} | {pname}: fl({a:.9g} * fl({q.scale:.9g} x)) | {f(dt)} | {bw} of {args.n} |")


if __name__ == "__main__":
    main()
