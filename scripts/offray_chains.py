"""Off-ray inputs against Captum's riemann_middle (zero baseline): how far bit-identical chains get.

docs/SERVICES.md shows that no plan whose queries lie ON the ray (inputs ``c x``) shares its points
bit-identically under Captum's riemann_middle. An attacker may also send inputs OFF the ray, chosen pixel by
pixel: with m = 2 (nodes 1/4, 3/4, exact in float32) the query ``y`` evaluates the gradient at ``y / 4`` and at
``fl(0.75 y)`` (Captum's ``baseline + alpha * (input - baseline)`` in float64). If ``fl(0.75 y0) = x`` the top
point is ``x`` itself; the other point ``y0 / 4`` must then be cancelled by a query ``y1`` with
``fl(0.75 y1) = y0 / 4``, and so on down to the baseline (where the two points of the last query coincide).
Such a chain exists only if every target has a preimage under ``y -> fl(0.75 y)``; ~1/3 of the floats in the
top quarter of each binade have none. Counted here on the pixel values of MNIST test images, per image (all
784 pixels share the queries, so one dead pixel kills the chain), with a depth-first search over the
preimage choices and, optionally, "shift" blocks (a query ``4 p`` and a second query through its top point that
may leave ``p`` for a neighbour).

Usage:  python scripts/offray_chains.py [--n 64] [--stop 1e-30]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import jaxrecover as jr

TOP = 0.75  # Captum riemann_middle, m = 2: nodes (0.25, 0.75), weights (0.5, 0.5), all exact in float32


def preimages(p: float) -> list[float]:
    """The float64 inputs ``y`` with ``0 + 0.75 * (y - 0) == p`` (Captum's expression, zero baseline)."""
    c = [p / TOP]
    for _ in range(3):
        c = [np.nextafter(c[0], -np.inf), *c, np.nextafter(c[-1], np.inf)]
    return [float(y) for y in c if 0.0 + TOP * (y - 0.0) == p]


def chain(p: float, stop: float, shifts: int, budget: list[int]) -> bool:
    """A chain from top point ``p`` down to ``|point| <= stop`` exists (depth-first; ``budget`` caps the work)."""
    if abs(p) <= stop:
        return True
    budget[0] -= 1
    if budget[0] < 0:
        return False
    starts = {p}
    for _ in range(shifts):  # query 4p (points p, fl(3p)), then fl(3p) as the top of a query that may move p
        starts |= {y / 4 for s in starts for y in preimages(0.75 * (4 * s))}
    return any(chain(y / 4, stop, shifts, budget) for s in sorted(starts, key=lambda s: s != p)
               for y in preimages(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="first N MNIST test images")
    ap.add_argument("--stop", type=float, default=1e-30,
                    help="a chain ends when its points are this small (0: exactly at the baseline)")
    ap.add_argument("--budget", type=int, default=20000, help="search nodes per pixel value")
    args = ap.parse_args()
    sys.setrecursionlimit(100000)
    ds = jr.load_dataset("mnist")
    x = jr.normalize(ds.test_images[:args.n], dtype=np.float64).reshape(args.n, -1)
    values = np.unique(x)
    top = {float(v): bool(preimages(float(v))) for v in values}
    print(f"{len(values)} distinct pixel values in the first {args.n} test images; {sum(not t for t in top.values())} "
          f"have no input y with fl(0.75 y) = value; images with such a pixel: "
          f"{sum(any(not top[float(v)] for v in np.unique(r)) for r in x)} of {args.n}")
    for shifts in (0, 1, 2):
        ok = {v: t and chain(v, args.stop, shifts, [args.budget]) for v, t in top.items()}
        images = sum(all(ok[float(v)] for v in np.unique(r)) for r in x)
        print(f"shift blocks per level {shifts}: chains to |t| <= {args.stop:g} exist for {sum(ok.values())} of "
              f"{len(values)} values; for every pixel of {images} of {args.n} images", flush=True)


if __name__ == "__main__":
    main()
