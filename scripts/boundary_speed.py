"""Boundary search speed: jaxrecover against the reference pipeline (Foolbox 3.3.4 L2PGD + L2CarliniWagner).

Usage:  python scripts/boundary_speed.py [--models twolayer,lenet] [--n 32] [--rounds 2] [--docs docs/BOUNDARY.md]
(needs the services extra with foolbox: `bash scripts/setup.sh dev,services`)

Same trained weights (checkpoints/<model>, float32), same first --n MNIST test images, same settings: L2 PGD over
the reference's eps list (40 steps, relative step 2 eps / 40, random start; each image keeps its first success,
a larger eps runs only on the images still failing - the same early exit for every pipeline), then L2
Carlini-Wagner (9 binary steps, 100 steps, step 1e-2, abort early) kept within eps 1.0, the closer of the two
kept. Pipelines, interleaved in every round (median wall seconds reported, spread in brackets):
- jaxrecover pgd+cw: jr.boundary_search(methods=("pgd", "cw")), jitted, after a compile;
- jaxrecover facet: the exact facet search (methods=("facet",)), from K + 1 = 11 starts per image, and from 4
  (facet_starts=3: the nearest linearised boundary and the 3 classes whose linearised boundaries are nearest);
- foolbox + torch twin: Foolbox on jaxrecover.services.external.torch_twins (the same weights in PyTorch);
- foolbox + JAX model: Foolbox driving our jitted JAX logits through eagerpy.
Reported: boundary points per second (the search is the whole cost of BSM/BIG: the attribution afterwards is one
gradient or one 11-point IG), success rate, mean L2 in [0, 1] pixel units over the images found.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover import search as B
from jaxrecover.fileio import atomic_write_text, write_marked_block


def ours(methods, **kwargs):
    def run(model, v, x, labels):
        res = B.boundary_search(model, v, x, labels, methods=methods, **kwargs)
        jax.block_until_ready(res.point)
        return np.asarray(res.point), np.asarray(res.success)
    return run


def foolbox_reference(fmodel, x, y, box, wrap, unwrap):
    """The reference's search with Foolbox: PGD over the eps list on the images still failing, then CW."""
    import foolbox as fb
    n = x.shape[0]
    point, ok = np.array(unwrap(x)), np.zeros(n, bool)
    for e in B.PGD_EPS:
        idx = np.flatnonzero(~ok)
        if idx.size == 0:
            break
        attack = fb.attacks.L2PGD(rel_stepsize=2 * e / 40, steps=40, random_start=True)
        _, clipped, success = attack(fmodel, wrap(unwrap(x)[idx]), wrap(unwrap(y)[idx]), epsilons=e * box.scale)
        s = np.asarray(unwrap(success), bool)
        point[idx[s]] = unwrap(clipped)[s]
        ok[idx[s]] = True
    cw = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=100, stepsize=1e-2, abort_early=True)
    _, clipped, success = cw(fmodel, x, y, epsilons=B.CW_EPS * box.scale)
    s, c = np.asarray(unwrap(success), bool), np.asarray(unwrap(clipped))
    x0 = np.asarray(unwrap(x))
    d_pgd = np.where(ok, np.linalg.norm((point - x0).reshape(n, -1), axis=1), np.inf)
    d_cw = np.where(s, np.linalg.norm((c - x0).reshape(n, -1), axis=1), np.inf)
    take = d_cw < d_pgd
    point[take] = c[take]
    return point, ok | s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="twolayer,lenet")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/boundary")
    ap.add_argument("--docs", default=None, help="fill the <!-- boundary_speed:begin/end --> block of this file")
    args = ap.parse_args()
    import foolbox as fb
    import torch
    from jaxrecover.services.external.torch_twins import from_nchw, to_nchw, torch_twin

    command = "python scripts/boundary_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    os.makedirs(args.out, exist_ok=True)
    ds = jr.load_dataset("mnist")
    box = B.InputBox.mnist()
    lo = float(np.float32(box.lower)) - 1e-6  # the float32 images lie a hair below the exact bound
    rows = []
    for name in args.models.split(","):
        _, v, meta = jr.load_trained(f"checkpoints/{name}", model=name)
        model = jr.make_model(name)
        x = jnp.asarray(jr.normalize(ds.test_images[:args.n], dtype=np.float32))
        labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
        twin = torch_twin(name, v)
        f_torch = fb.PyTorchModel(twin, bounds=(lo, box.upper), device="cpu")
        x_t, y_t = torch.from_numpy(np.array(to_nchw(x))), torch.from_numpy(np.asarray(labels).astype(np.int64))
        f_jax = fb.JAXModel(jax.jit(lambda z: model.batched(v, z)), bounds=(lo, box.upper))
        pipelines = {
            "jaxrecover pgd+cw": lambda: ours(("pgd", "cw"))(model, v, x, labels),
            "jaxrecover facet": lambda: ours(("facet",))(model, v, x, labels),
            "jaxrecover facet, 4 starts": lambda: ours(("facet",), facet_starts=3)(model, v, x, labels),
            "foolbox + torch twin": lambda: (lambda r: (from_nchw(r[0]), r[1]))(foolbox_reference(
                f_torch, x_t, y_t, box, lambda a: torch.from_numpy(np.ascontiguousarray(a)),
                lambda a: a.detach().numpy() if hasattr(a, "detach") else np.asarray(a))),
            "foolbox + JAX model": lambda: foolbox_reference(f_jax, x, labels, box, jnp.asarray, np.asarray),
        }
        for k in [k for k in pipelines if k.startswith("jaxrecover")]:  # compile outside the timing
            pipelines[k]()
        seconds = {k: [] for k in pipelines}
        results = {}
        for r in range(args.rounds):
            for k, run in pipelines.items():
                t0 = time.perf_counter()
                results[k] = run()
                seconds[k].append(time.perf_counter() - t0)
                print(f"{name} round {r + 1}: {k} {seconds[k][-1]:.1f} s", flush=True)
        x0 = np.asarray(x).reshape(args.n, -1)
        common = np.logical_and.reduce([ok for _, ok in results.values()])
        for k, (point, ok) in results.items():
            d = np.linalg.norm(np.asarray(point).reshape(args.n, -1) - x0, axis=1) / box.scale
            med = float(np.median(seconds[k]))
            rows.append({"model": name, "weights_sha256": meta["state_sha256"], "n": args.n, "pipeline": k,
                         "seconds": seconds[k], "median_s": med, "points_per_s": args.n / med,
                         "success": float(np.mean(ok)), "mean_l2": float(np.mean(d[ok])) if ok.any() else None,
                         "common": int(common.sum()),
                         "mean_l2_common": float(np.mean(d[common])) if common.any() else None})
    atomic_write_text(os.path.join(args.out, "speed.json"), json.dumps({"command": command, "rows": rows}, indent=1))
    text = markdown(rows, command, args.rounds)
    print(text)
    if args.docs:
        write_marked_block(args.docs, "boundary_speed", text)


def markdown(rows, command, rounds):
    out = [f"Generated by `{command}` (rows: results/boundary/speed.json; median of {rounds} interleaved rounds, "
           "min-max in brackets; this 2-core CPU, float32).", "",
           "| model | n | pipeline | seconds | boundary points / s | vs foolbox + torch | vs foolbox + JAX | found | "
           "mean L2 (pixels), found | on the images all found |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peers = {p["pipeline"]: p for p in rows if p["model"] == r["model"]}
        ratio = (lambda k: f"{peers[k]['median_s'] / r['median_s']:.1f}x")
        out.append(f"| {r['model']} | {r['n']} | {r['pipeline']} | {r['median_s']:.1f} "
                   f"({min(r['seconds']):.1f}-{max(r['seconds']):.1f}) | {r['points_per_s']:.2f} | "
                   f"{ratio('foolbox + torch twin')} | {ratio('foolbox + JAX model')} | {r['success']:.0%} | "
                   f"{'-' if r['mean_l2'] is None else format(r['mean_l2'], '.3f')} | "
                   f"{'-' if r['mean_l2_common'] is None else format(r['mean_l2_common'], '.3f')} ({r['common']}) |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
