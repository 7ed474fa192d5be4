"""White-box audit of the kink location behind R.recover_fixed_steps_from_kinks (float64, zero baseline).

Locates the kinks of f along the ray of one MNIST test image from output values, exactly as the recovery does,
then checks with autodiff that the gradient is constant inside every gap between brackets (three points per gap,
plus the two points a quarter of a bracket's width outside each bracket) and prints the gaps where it is not, with
the size of the change there and the part of it between the windows where the recovery's jump pairs read the
gradient (a change inside a window is read with that bracket's jump; one between two windows is missed).

Usage:  python scripts/kinks_audit.py [--model lenet] [--image 0] [--grid 16384]
Needs a trained checkpoint in checkpoints/<model>.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover.attacks import kinks as K

jax.config.update("jax_enable_x64", True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--grid", type=int, default=16384)
    args = ap.parse_args()
    _, v32, _ = jr.load_trained(f"checkpoints/{args.model}", model=args.model)
    ds = jr.load_dataset("mnist")
    v = jr.cast_variables(v32, jnp.float64)
    model = jr.make_model(args.model)
    x = np.asarray(jr.normalize(ds.test_images[args.image:args.image + 1], dtype=np.float64))[0]
    target = int(ds.test_labels[args.image])
    svc = jr.SimulatedIGService(model, v, rule="riemann_right", steps=50, fixed_steps=True)
    phi_of = K._RayValues(svc, np.zeros_like(x), x, target, 2048)
    h = 1.0 / args.grid
    t = np.concatenate([[0.0], h * 2.0 ** -np.arange(40, 0, -1), np.arange(1, args.grid + 3) * h])
    t0 = time.time()
    phi = phi_of(t)
    tol = 16 * np.finfo(np.float64).eps * float(np.max(np.abs(phi)))
    lo, hi = K._locate_kinks(phi_of, t, phi, tol)
    print(f"{args.model} image {args.image}: {lo.size} brackets from {phi_of.count} output values "
          f"({time.time() - t0:.0f} s)")
    grad = jax.jit(jax.vmap(jax.grad(lambda z: model(v, z)[target])))

    def g(ts):
        return np.concatenate([np.asarray(grad(jnp.asarray(ts[k:k + 1024, None, None, None] * x[None])))
                               .reshape(min(1024, ts.size - k), -1) for k in range(0, ts.size, 1024)])

    a = np.concatenate([[0.0], hi])
    c = np.concatenate([lo, [1.0]])
    # the points next to each bracket, a quarter of its width outside it (the narrowest window a jump pair uses)
    width = hi - lo
    m_a = np.concatenate([[0.0], 0.25 * width + 1e-15 * hi])
    m_c = np.concatenate([0.25 * width + 1e-15 * hi, [0.0]])
    # where the recovery's jump pairs actually read the gradient (R.recover_fixed_steps_from_kinks takes the
    # widest window the other echoes allow): a change between two windows is never read
    nodes, weights = (np.asarray(q, np.float64) for q in svc.quadrature(svc.steps))
    candidates, a_top = K._heavy_nodes(nodes, weights)
    ratios = nodes / a_top
    pairs = K._jump_queries(lo, hi, ratios, weights, candidates, 1.0 / ratios[candidates[0]] * (1 + 2 / args.grid))
    read_lo = np.array([p[0] * ratios[p[2]] if p else np.nan for p in pairs])  # t below bracket k
    read_hi = np.array([p[1] * ratios[p[2]] if p else np.nan for p in pairs])  # t above bracket k
    w_a = np.concatenate([[0.0], read_hi])  # gap k is read from w_a[k] (above bracket k-1) to w_c[k]
    w_c = np.concatenate([read_lo, [1.0]])
    keep = c > a
    a, c, m_a, m_c, w_a, w_c = a[keep], c[keep], m_a[keep], m_c[keep], w_a[keep], w_c[keep]
    m_a, m_c = np.minimum(m_a, 0.5 * (c - a)), np.minimum(m_c, 0.5 * (c - a))
    m_a = np.where(a == 0.0, 1e-3 * (c - a), m_a)  # not the baseline itself: the recovery reads g(0+) mid-gap
    w_a = np.where(a == 0.0, a + m_a, w_a)
    fr = np.array([0.001, 0.5, 0.999])
    pts = np.concatenate([(a + m_a)[:, None], a[:, None] + fr[None] * (c - a)[:, None], (c - m_c)[:, None],
                          w_a[:, None], w_c[:, None]], axis=1)
    G = g(np.nan_to_num(pts.reshape(-1), nan=0.5)).reshape(a.size, pts.shape[1], -1)
    change = np.max(np.abs(G[:, :5] - G[:, :1]), axis=(1, 2))
    scale = float(np.max(np.abs(G)))
    # between the windows: w_a, w_c and the interior samples inside [w_a, w_c]
    within = np.concatenate([np.ones((a.size, 1), bool), (pts[:, 1:4] >= pts[:, 5:6]) & (pts[:, 1:4] <= pts[:, 6:7]),
                             np.ones((a.size, 1), bool)], axis=1)
    inner = G[:, [5, 1, 2, 3, 6]]
    diff = np.where(within[..., None], np.abs(inner - inner[:, :1]), 0.0)
    unread = np.where(np.isfinite(w_a) & np.isfinite(w_c), np.max(diff, axis=(1, 2)), np.nan)
    bad = np.flatnonzero(change > 1e-9 * scale)
    print(f"gaps checked: {a.size}; gaps where the gradient still changes: {bad.size} (max |g| on the ray {scale:.3g})")
    for k in bad:
        print(f"  gap [{a[k]:.9g}, {c[k]:.9g}]: max change {change[k]:.3g}, "
              f"change of phi's slope {abs(float((G[k, 4] - G[k, 0]) @ x.reshape(-1))):.3g}; "
              f"between the jump pairs' windows: {unread[k]:.3g}")
    worst = np.nanmax(unread) if np.isfinite(unread).any() else float("nan")
    print(f"changes between the jump pairs' windows (what the recovery cannot read): "
          f"{int(np.sum(unread > 1e-9 * scale))} gaps, max {worst:.3g}")


if __name__ == "__main__":
    main()
