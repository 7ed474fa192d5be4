"""Small diagnostic studies behind single tables of docs/RECOVERY.md, docs/SERVICES.md and README.md.

* ``approx-plans``: the error of the approximate plans when the service fixes the step count (eq. (3) with a
  second query at a x on models with bias, eq. (2) on no-bias models), under every IG rule.
* ``ray-breakpoints``: how many linear-region boundaries the ray from the zero baseline to x crosses, the cost
  driver of fixed-m recovery: first-layer crossings (exact: each unit's pre-activation is affine in t and changes
  sign at most once) and gradient changes between the points of a uniform grid (all layers; a lower bound).
* ``accuracy``: the test accuracy of the default checkpoints against the paper's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..attacks import approx_plan, attack, nobias_plan
from ..data import normalize
from ..engine import explain
from ..explainers import RULES, VG
from ..metrics import normalized_distance
from ..models import MODEL_NAMES, cast_variables
from ..services import SimulatedIGService
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["ApproxPlansStudy", "RayBreakpointsStudy", "AccuracyStudy", "first_layer_crossings", "grid_changes"]


@dataclasses.dataclass(frozen=True)
class ApproxConfig:
    models: tuple[str, ...] = option(("twolayer_nobias", "twolayer", "lenet_nobias", "lenet"), "models")
    n: int = option(100, "first N test images")
    steps: int = option(50, "the service's fixed step count m")
    a: float = option(0.98, "the second query's scale (eq. (3))")
    dtype: str = option("float64", "dtype of weights, inputs and answers")


class ApproxPlansStudy(Study):
    name = "approx-plans"
    title = "Error of the approximate plans (eq. (3), eq. (2)) under a fixed step count, every rule"
    Config = ApproxConfig
    doc, block = "docs/RECOVERY.md", "approx_plans"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=8)

    def units(self, cfg):
        return [Unit({"model": m, "n": cfg.n, "steps": cfg.steps, "a": cfg.a, "dtype": cfg.dtype}, (m,), label=m)
                for m in cfg.models]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, _ = ctx.checkpoint(s["model"])
        ds = ctx.dataset()
        dtype = np.dtype(s["dtype"])
        x = jnp.asarray(normalize(ds.test_images[:s["n"]], dtype))
        y = jnp.asarray(ds.test_labels[:s["n"]])
        v = cast_variables(v32, dtype)
        vg = explain(VG(), model, v, x, y)
        rows = []
        for rule in RULES:
            plan = nobias_plan(rule, s["steps"]) if s["model"].endswith("nobias") else approx_plan(rule, s["steps"],
                                                                                                    s["a"])
            rec, mask, _ = attack(SimulatedIGService(model, v, rule=rule), plan, x, y)
            d = np.asarray(normalized_distance(vg, rec, mask))
            rows.append({"model": s["model"], "rule": rule, "plan": plan.name, "mean": float(d.mean()),
                         "max": float(d.max())})
        return rows

    def markdown(self, rows, cfg):
        models = list(dict.fromkeys(r["model"] for r in rows))
        out = [f"Mean (max) distance to the true VG over the first {cfg.n} test images, m = {cfg.steps}, {cfg.dtype}:",
               "", "| rule | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for rule in dict.fromkeys(r["rule"] for r in rows):
            cells = {r["model"]: f"{r['plan']}: {r['mean']:.2e} ({r['max']:.2e})" for r in rows if r["rule"] == rule}
            out.append(f"| {rule} | " + " | ".join(cells.get(m, "-") for m in models) + " |")
        return "\n".join(out)


def first_layer_crossings(model, v, x) -> int:
    """Distinct t in (0, 1) where a first-layer unit's pre-activation changes sign on the ray t x."""
    stem = model.affine_stem.stem
    h0 = np.asarray(stem(v, jnp.zeros_like(x)), np.float64).ravel()  # the biases, per unit
    h1 = np.asarray(stem(v, x), np.float64).ravel()
    slope = h1 - h0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(slope != 0, -h0 / slope, np.nan)
    t = t[(t > 0) & (t < 1)]
    return int(np.unique(np.round(t, 12)).size)


def grid_changes(model, v, x, target, grid: int, chunk: int = 500) -> int:
    """Gradient changes between consecutive points of a ``grid``-point uniform grid on the ray (changes closer
    together than the grid spacing count once)."""
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


@dataclasses.dataclass(frozen=True)
class RayConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet", "resnet18"), "models")
    n: int = option(4, "first N test images")
    grid: int = option(20001, "points of the uniform grid on the ray")


class RayBreakpointsStudy(Study):
    name = "ray-breakpoints"
    title = "Linear-region boundaries the ray from the zero baseline crosses (the cost of fixed-m recovery)"
    Config = RayConfig
    doc, block = "docs/SERVICES.md", "ray_breakpoints"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=1, grid=2001)

    def units(self, cfg):
        return [Unit({"model": m, "image": i, "grid": cfg.grid}, (m,), label=f"{m} {i}")
                for m in cfg.models for i in range(cfg.n)]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, _ = ctx.checkpoint(s["model"])
        ds = ctx.dataset()
        v = cast_variables(v32, jnp.float64)
        x = jnp.asarray(normalize(ds.test_images[s["image"]:s["image"] + 1], dtype=np.float64))[0]
        target = int(ds.test_labels[s["image"]])
        return [{**s, "first_layer": first_layer_crossings(model, v, x),
                 "grid_changes": grid_changes(model, v, x, target, s["grid"])}]

    def markdown(self, rows, cfg):
        out = [f"| model | image | first-layer crossings (exact) | gradient changes on a {cfg.grid}-point grid |",
               "|---|---|---|---|"]
        out += [f"| {r['model']} | {r['image']} | {r['first_layer']} | {r['grid_changes']} |" for r in rows]
        return "\n".join(out)


#: The paper's test accuracies (60k/10k MNIST), PAPER.md.
PAPER_ACCURACY = {"twolayer_nobias": 95.77, "twolayer": 95.69, "lenet_nobias": 98.81, "lenet": 98.92,
                  "resnet18": 99.42}


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
    models: tuple[str, ...] = option(tuple(MODEL_NAMES), "models (default training configs)")


class AccuracyStudy(Study):
    name = "accuracy"
    title = "Test accuracy of the default checkpoints against the paper's"
    Config = AccuracyConfig
    doc, block = "README.md", "accuracy"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",))

    def units(self, cfg):
        return [Unit({"model": m}, (m,), label=m) for m in cfg.models]

    def run(self, unit, ctx):
        m = unit.settings["model"]
        _, _, meta = ctx.checkpoint(m)
        return [{"model": m, "test_accuracy": meta["test_accuracy"], "test_size": meta.get("test_size"),
                 "epochs": meta["epochs"], "train_seconds": meta.get("train_seconds")}]

    def markdown(self, rows, cfg):
        out = ["| model | test acc. (offline MNIST) | paper (60k/10k) | difference | epochs | train s |",
               "|---|---|---|---|---|---|"]
        for r in rows:
            acc = 100 * r["test_accuracy"]
            paper = PAPER_ACCURACY.get(r["model"])
            out.append(f"| {r['model']} | {acc:.2f} % ({r['test_size']} images) | "
                       + (f"{paper:.2f} % | {acc - paper:+.2f} |" if paper else "- | - |")
                       + f" {r['epochs']} | {r['train_seconds']:.0f} |")
        return "\n".join(out)
