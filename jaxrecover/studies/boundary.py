"""docs/BOUNDARY.md: boundary search (reference PGD + CW against the exact facet search) and Boundary Attribution.

Per model (float32 weights; the first ``n`` test images, ``n_resnet`` for resnet18, explained at the model's
prediction):

1. boundary search with the reference pipeline (``search.boundary_search`` methods pgd + cw: L2 PGD over the
   reference's eps list, 40 steps, first success per example; L2 Carlini-Wagner, 100 steps, kept within eps 1.0;
   the closer of the two) and with the exact facet search: success rate, mean L2 distance in [0, 1] pixel units
   on the examples both found, wall seconds (after a first call that compiles);
2. on the examples the facet search found: the paper's distance between BSM and VG, and between BIG (IG from the
   boundary point, riemann_trapezoid, 10 steps) and IG (zero-image baseline, same rule and steps); baseline
   sensitivity: BIG against IG from the zero, blurred and random baselines;
3. a figure of VG, IG (three baselines), BSM and BIG for four digits (``OUT/maps_<label>.png``);
4. leakage (``leak_models``, first ``n_leak`` images, float64): VG recovered from a BIG service with the
   baseline guessed as zeros, known (oracle), or estimated from d + 1 probes (``probe_models``, ``probes``
   images; ``attacks.recover_from_big``).

Checkpoints (``BOUNDARY_CHECKPOINTS``): the 10-epoch TwoLayerNet, LeNet trained 8 epochs plainly and with L2 PGD
(eps 0.5 and 1.0; Madry et al.: random start, 7 steps of 2.5 eps / 7), ResNet18 at its default epochs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..data import MNIST_MEAN, MNIST_STD
from ..attacks import attack, exact_plan, recover_from_big
from ..data import normalize
from ..engine import explain
from ..explainers import BIG, BSM, IG, VG, BlurBaseline
from ..fileio import atomic_savefig
from ..models import cast_variables
from ..metrics import normalized_distance
from ..search import InputBox, boundary_attributions, boundary_search
from ..services import AssumedBaseline, BoundaryBaseline, SimulatedIGService
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["BoundaryStudy", "BOUNDARY_CHECKPOINTS"]

BOUNDARY_CHECKPOINTS = {
    "twolayer": TrainConfig(model="twolayer", epochs=10),
    "lenet-std8": TrainConfig(model="lenet", epochs=8),
    "lenet-adv05": TrainConfig(model="lenet", epochs=8, adv_eps=0.5),
    "lenet-adv1": TrainConfig(model="lenet", epochs=8, adv_eps=1.0),
    "resnet18": TrainConfig(model="resnet18"),
}


@dataclasses.dataclass(frozen=True)
class BoundaryConfig:
    models: tuple[str, ...] = option(tuple(BOUNDARY_CHECKPOINTS), "checkpoint labels (BOUNDARY_CHECKPOINTS)")
    n: int = option(32, "test images per model")
    n_resnet: int = option(8, "test images for resnet18 (about 1 s per image)")
    leak_models: tuple[str, ...] = option(("twolayer", "lenet-std8"), "models whose BIG leakage is measured")
    n_leak: int = option(8, "images of the leakage measurement")
    probe_models: tuple[str, ...] = option(("twolayer",), "models of the probe attack (d + 1 = 785 BIG queries per "
                                           "image, each a boundary search: ~80 s per image on twolayer)")
    probes: int = option(2, "images of the probe attack")


def timed_search(model, v, x, labels, methods):
    jax.block_until_ready(boundary_search(model, v, x, labels, methods=methods).point)  # compile (same shapes)
    t0 = time.time()
    res = boundary_search(model, v, x, labels, methods=methods)
    jax.block_until_ready(res.point)
    return res, time.time() - t0


def dist(a, b, ok):
    d = np.asarray(normalized_distance(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))[ok]
    d = d[np.isfinite(d)]
    return {"mean": float(np.mean(d)), "max": float(np.max(d)), "n": int(d.size),
            "exact": float(np.mean(d <= 1e-6))} if d.size else None


def leakage(model, v, x, labels, probes: int, progress: bool = True):
    """Recovering VG from a BIG service (float64, facet search, riemann_trapezoid 10 steps, caller's m allowed):
    answers as they come, a zero-baseline guess, the true boundary point (oracle), and the point estimated from
    d + 1 probes (first ``probes`` images); the plan is exact_plan(riemann_trapezoid, 50) (scales 1 and 0.98)."""
    v64 = cast_variables(v, jnp.float64)
    x = x.astype(jnp.float64)
    res = boundary_search(model, v64, x, labels, methods=("facet",))
    ok = np.asarray(res.success)
    vg = explain(VG(), model, v64, x, labels)
    big = SimulatedIGService(model, v64, rule="riemann_trapezoid", steps=10, baseline=BoundaryBaseline(model, v64))
    plan = exact_plan("riemann_trapezoid", 50)
    out = {"n": int(x.shape[0]), "plan": plan.name, "plan_queries": len(plan.queries)}
    out["as_is"] = dist(big(x, labels), vg, ok)
    for key, guess in (("zeros", jnp.zeros_like(x)), ("oracle", res.point)):
        g, _, _ = attack(AssumedBaseline(big, guess), plan, x, labels)
        out[key] = dist(g, vg, ok)
    if probes:
        big.reset_counters()
        g, _, rep = recover_from_big(big, x[:probes], labels[:probes], plan=plan, progress=progress)
        pts = rep.points
        out["probes"] = dist(g, vg[:probes], ok[:probes])
        out["probes"]["queries_per_image"] = big.queries / probes
        out["probes"]["point_error"] = float(np.max(np.abs(pts - np.asarray(res.point[:probes]))))
        out["probes"]["stable"] = int(np.sum(np.asarray(rep.misfit) < 1e-9))
    return out


def figure(name, x, maps, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = ["input", *maps]
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.8 * len(cols), 1.8 * len(x)), squeeze=False)
    for i in range(len(x)):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            img = np.asarray(x[i] if c == "input" else maps[c][i], np.float64)[..., 0]
            if c == "input":
                ax.imshow(img, cmap="gray")
            else:
                m = np.nanmax(np.abs(img)) if np.isfinite(img).any() else 1.0
                ax.imshow(img, cmap="bwr", vmin=-m, vmax=m)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c)
    fig.suptitle(f"{name}: boundary attributions (facet search)")
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=100)


def describe(label: str) -> str:
    tc = BOUNDARY_CHECKPOINTS[label]
    extra = f", L2-PGD trained, eps {tc.adv_eps:g}" if tc.adv_eps else ""
    return f"{label} ({tc.model}, {tc.resolved_epochs()} epochs{extra})"


class BoundaryStudy(Study):
    name = "boundary"
    title = "Boundary search (PGD+CW vs facet search) and Boundary Attribution (BSM, BIG), its leakage"
    Config = BoundaryConfig
    doc, block = "docs/BOUNDARY.md", "boundary_table"

    def checkpoints(self, cfg):
        unknown = [m for m in (*cfg.models, *cfg.leak_models, *cfg.probe_models) if m not in BOUNDARY_CHECKPOINTS]
        if unknown:
            raise ValueError(f"models {unknown}: this study declares {list(BOUNDARY_CHECKPOINTS)}")
        return {m: BOUNDARY_CHECKPOINTS[m] for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=4, leak_models=("twolayer",), n_leak=2, probes=0)

    def units(self, cfg):
        self.checkpoints(cfg)
        out = []
        for m in cfg.models:
            n = cfg.n_resnet if BOUNDARY_CHECKPOINTS[m].model.startswith("resnet") else cfg.n
            leak = min(cfg.n_leak, n) if m in cfg.leak_models else 0
            probes = cfg.probes if leak and m in cfg.probe_models else 0
            out.append(Unit({"model": m, "n": n, "n_leak": leak, "probes": probes}, (m,), label=m))
        return out

    def run(self, unit, ctx):
        s = unit.settings
        label, n = s["model"], s["n"]
        model, v, meta = ctx.checkpoint(label)
        ds = ctx.dataset("mnist")
        box = InputBox.mnist()
        x = jnp.asarray(normalize(ds.test_images[:n], dtype=np.float32))
        labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
        ref, ref_s = timed_search(model, v, x, labels, ("pgd", "cw"))
        fac, fac_s = timed_search(model, v, x, labels, ("facet",))
        both = np.asarray(ref.success & fac.success)
        found = np.asarray(fac.success)
        row = {"model": label, "label": describe(label), "n": n, "test_accuracy": meta.get("test_accuracy"),
               "ref_success": float(jnp.mean(ref.success)), "facet_success": float(jnp.mean(fac.success)),
               "common": int(both.sum()),
               "ref_distance": float(np.mean(np.asarray(ref.distance)[both]) / box.scale) if both.any() else None,
               "facet_distance": float(np.mean(np.asarray(fac.distance)[both]) / box.scale) if both.any() else None,
               "facet_distance_all": float(np.mean(np.asarray(fac.distance)[found]) / box.scale)
               if found.any() else None,
               "ref_s": ref_s, "facet_s": fac_s,
               "ref_pgd_share": float(jnp.mean(ref.method[ref.success] == 0)) if bool(ref.success.any()) else None}
        zero = jnp.broadcast_to(jnp.asarray(normalize(np.zeros((1, 28, 28), np.uint8), dtype=np.float32)), x.shape)
        noise = (np.random.default_rng(0).uniform(size=x.shape) - MNIST_MEAN) / MNIST_STD
        baselines = {"zero": zero, "blur": BlurBaseline(sigma=5.0)(x), "random": jnp.asarray(noise, x.dtype)}
        # dense like BIG's default: the table in docs/BOUNDARY.md was computed before the native sparse path
        rule = IG(steps=10, rule="riemann_trapezoid", sparse_path=False)
        vg = explain(VG(), model, v, x, labels)
        igs = {k: explain(rule, model, v, x, labels, baseline=b) for k, b in baselines.items()}
        bsm = boundary_attributions(BSM(), model, v, x, labels, fac)
        big = boundary_attributions(BIG(), model, v, x, labels, fac)
        row["bsm_vg"] = dist(bsm, vg, found)
        row["big_ig"] = dist(big, igs["zero"], found)
        row["big_baselines"] = {k: dist(big, ig, found) for k, ig in igs.items()}
        row["ig_zero_vs"] = {k: dist(igs["zero"], ig, found) for k, ig in igs.items() if k != "zero"}
        figure(describe(label), x[:4], {"VG": vg[:4], "IG (zero)": igs["zero"][:4], "IG (blur)": igs["blur"][:4],
                                        "IG (random)": igs["random"][:4], "BSM": bsm[:4], "BIG": big[:4]},
               ctx.out / f"maps_{label}.png")
        if s["n_leak"]:
            m = s["n_leak"]
            row["leak"] = leakage(model, v, x[:m], labels[:m], s["probes"], ctx.progress)
        return [row]

    def markdown(self, rows, cfg):
        f = (lambda v: "-" if v is None else f"{v:.3f}")
        d = (lambda v: "-" if v is None else f"{v['mean']:.3f} ({v['max']:.3f})")
        out = ["Seconds: wall time after compiling; distances: the paper's, mean (max) over the images the facet "
               "search found.", "",
               "| model | test acc | n | reference PGD+CW found | facet found | both | mean L2 (pixels) reference | "
               "facet | facet, all found | reference s | facet s | dist(BSM, VG) | dist(BIG, IG) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['label']} | {r['test_accuracy']:.2%} | {r['n']} | {r['ref_success']:.0%} | "
                       f"{r['facet_success']:.0%} | {r['common']} | {f(r['ref_distance'])} | "
                       f"{f(r['facet_distance'])} | {f(r['facet_distance_all'])} | {r['ref_s']:.1f} | "
                       f"{r['facet_s']:.1f} | {d(r['bsm_vg'])} | {d(r['big_ig'])} |")
        out += ["", "Baseline sensitivity: the paper's distance of BIG to IG from other baselines (same rule and "
                "steps: riemann_trapezoid, 10), and of IG (zero) to IG from the others. Zero: the black image; blur: "
                "the input blurred (Gaussian, sigma 5 pixels); random: uniform noise in [0, 1] pixels (seed 0).", "",
                "| model | BIG vs IG zero | BIG vs IG blur | BIG vs IG random | IG zero vs IG blur | "
                "IG zero vs IG random |", "|---|---|---|---|---|---|"]
        for r in rows:
            b, z = r["big_baselines"], r["ig_zero_vs"]
            out.append(f"| {r['label']} | {d(b['zero'])} | {d(b['blur'])} | {d(b['random'])} | {d(z['blur'])} | "
                       f"{d(z['random'])} |")
        leaks = [r for r in rows if "leak" in r]
        if leaks:
            out += ["", "Leakage: VG recovered from a BIG service (float64; its baseline: the facet search's nearest "
                    "boundary point of each query; riemann_trapezoid, 10 steps, other step counts accepted), "
                    f"plan {leaks[0]['leak']['plan']} ({leaks[0]['leak']['plan_queries']} queries per image). Mean "
                    "(max) distance to VG; in brackets the share of images recovered to <= 1e-6.", "",
                    "| model | n | answers as they come | zero baseline assumed | true boundary point (oracle) | "
                    "point from d + 1 probes | probes: n, queries per image, images with stable probes |",
                    "|---|---|---|---|---|---|---|"]
            e = (lambda v: "-" if v is None else f"{v['mean']:.2g} ({v['max']:.2g}) [{v['exact']:.0%}]")
            for r in leaks:
                L = r["leak"]
                p = L.get("probes")
                probe = "-" if not p else f"{p['n']}, {p['queries_per_image']:.0f}, {p['stable']}"
                out.append(f"| {r['label']} | {L['n']} | {e(L['as_is'])} | {e(L['zeros'])} | {e(L['oracle'])} | "
                           f"{e(p) if p else '-'} | {probe} |")
        return "\n".join(out)
