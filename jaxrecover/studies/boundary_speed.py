"""Boundary search speed: jaxrecover against the reference pipeline (Foolbox 3.3.4 L2PGD + L2CarliniWagner).

Needs the services extra (foolbox, torch).

Same trained weights (the boundary study's checkpoints, float32), same first n MNIST test images, same settings: L2 PGD over
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

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..data import normalize
from ..search import CW_EPS, PGD_EPS, InputBox, boundary_search
from .base import Study, Unit, option
from .boundary import BOUNDARY_CHECKPOINTS

__all__ = ["BoundarySpeedStudy"]


def ours(methods, **kwargs):
    def run(model, v, x, labels):
        res = boundary_search(model, v, x, labels, methods=methods, **kwargs)
        jax.block_until_ready(res.point)
        return np.asarray(res.point), np.asarray(res.success)
    return run


def foolbox_reference(fmodel, x, y, box, wrap, unwrap):
    """The reference's search with Foolbox: PGD over the eps list on the images still failing, then CW."""
    import foolbox as fb
    n = x.shape[0]
    point, ok = np.array(unwrap(x)), np.zeros(n, bool)
    for e in PGD_EPS:
        idx = np.flatnonzero(~ok)
        if idx.size == 0:
            break
        attack = fb.attacks.L2PGD(rel_stepsize=2 * e / 40, steps=40, random_start=True)
        _, clipped, success = attack(fmodel, wrap(unwrap(x)[idx]), wrap(unwrap(y)[idx]), epsilons=e * box.scale)
        s = np.asarray(unwrap(success), bool)
        point[idx[s]] = unwrap(clipped)[s]
        ok[idx[s]] = True
    cw = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=100, stepsize=1e-2, abort_early=True)
    _, clipped, success = cw(fmodel, x, y, epsilons=CW_EPS * box.scale)
    s, c = np.asarray(unwrap(success), bool), np.asarray(unwrap(clipped))
    x0 = np.asarray(unwrap(x))
    d_pgd = np.where(ok, np.linalg.norm((point - x0).reshape(n, -1), axis=1), np.inf)
    d_cw = np.where(s, np.linalg.norm((c - x0).reshape(n, -1), axis=1), np.inf)
    take = d_cw < d_pgd
    point[take] = c[take]
    return point, ok | s


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet-std8"), "checkpoint labels (the boundary study's)")
    n: int = option(32, "test images")
    rounds: int = option(2, "interleaved rounds (the median is reported)")


class BoundarySpeedStudy(Study):
    name = "boundary-speed"
    title = "Boundary search speed: jaxrecover against Foolbox (PyTorch twin and JAX model), interleaved rounds"
    Config = SpeedConfig
    doc, block = "docs/BOUNDARY.md", "boundary_speed"
    out = "results/boundary"

    def checkpoints(self, cfg):
        return {m: BOUNDARY_CHECKPOINTS[m] for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=4, rounds=1)

    def units(self, cfg):
        return [Unit({"model": m, "n": cfg.n, "rounds": cfg.rounds}, (m,), label=m) for m in cfg.models]

    def run(self, unit, ctx):
        import foolbox as fb
        import torch

        from ..services.external.torch_twins import from_nchw, to_nchw, torch_twin

        s = unit.settings
        label, n = s["model"], s["n"]
        model, v, _ = ctx.checkpoint(label)
        ds = ctx.dataset()
        box = InputBox.mnist()
        lo = float(np.float32(box.lower)) - 1e-6  # the float32 images lie a hair below the exact bound
        x = jnp.asarray(normalize(ds.test_images[:n], dtype=np.float32))
        labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
        twin = torch_twin(BOUNDARY_CHECKPOINTS[label].model, v)
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
        for _ in range(s["rounds"]):
            for k, run in pipelines.items():
                t0 = time.perf_counter()
                results[k] = run()
                seconds[k].append(time.perf_counter() - t0)
        x0 = np.asarray(x).reshape(n, -1)
        common = np.logical_and.reduce([ok for _, ok in results.values()])
        rows = []
        for k, (point, ok) in results.items():
            d = np.linalg.norm(np.asarray(point).reshape(n, -1) - x0, axis=1) / box.scale
            med = float(np.median(seconds[k]))
            rows.append({"model": label, "n": n, "pipeline": k, "seconds": seconds[k], "median_s": med,
                         "points_per_s": n / med, "success": float(np.mean(ok)),
                         "mean_l2": float(np.mean(d[ok])) if ok.any() else None, "common": int(common.sum()),
                         "mean_l2_common": float(np.mean(d[common])) if common.any() else None})
        return rows

    def markdown(self, rows, cfg):
        out = [f"Median of {cfg.rounds} interleaved rounds, min-max in brackets; float32.", "",
               "| model | n | pipeline | seconds | boundary points / s | vs foolbox + torch | vs foolbox + JAX | found | "
               "mean L2 (pixels), found | on the images all found |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            peers = {p["pipeline"]: p for p in rows if p["model"] == r["model"]}
            ratio = (lambda k: f"{peers[k]['median_s'] / r['median_s']:.1f}x")
            out.append(f"| {r['model']} | {r['n']} | {r['pipeline']} | {r['median_s']:.1f} "
                       f"({min(r['seconds']):.1f}-{max(r['seconds']):.1f}) | {r['points_per_s']:.2f} | "
                       f"{ratio('foolbox + torch twin')} | {ratio('foolbox + JAX model')} | {r['success']:.0%} | "
                       f"{'-' if r['mean_l2'] is None else format(r['mean_l2'], '.3f')} | "
                       f"{'-' if r['mean_l2_common'] is None else format(r['mean_l2_common'], '.3f')} "
                       f"({r['common']}) |")
        return "\n".join(out)
