"""docs/SERVICES.md's precision diagnostics: what float64 round-off does to max-pool nets and to the kink scan.

* ``ulp-sensitivity``: why no attack on Captum's riemann_middle (zero baseline) reaches round-off on max-pool
  nets: (1) ties broken by round-off (the twin's first convolution on CONSTANT images: output channels holding
  more than one distinct value where exact arithmetic gives one); (2) the twin's autograd VG at x against x moved
  by one float64 ulp (down, up), and the JAX model's (XLA computes tied windows identically); (3) the point
  Captum evaluates instead of x under the plan ``best_plan`` picks (its largest point ``fl(a c x)``) and the
  twin's VG there. Weights: the default checkpoints, or random init (``random``). Needs the services extra.
* ``offray-chains``: off-ray inputs against Captum's riemann_middle (m = 2, nodes 1/4 and 3/4): a bit-identical
  chain of queries from x down to the baseline exists only if every target has a preimage under
  ``y -> fl(0.75 y)``; counted on the pixel values of the first ``n`` test images, with up to two "shift" blocks.
* ``kinks-audit``: the white-box audit of the kink location behind the fixed-m kink recovery
  (``attacks.audit_kinks``) on one test image.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..attacks import audit_kinks, best_plan
from ..data import normalize
from ..engine import explain
from ..explainers import VG
from ..metrics import normalized_distance
from ..models import cast_variables, init_variables, make_model
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["UlpSensitivityStudy", "OffRayChainsStudy", "KinksAuditStudy", "preimages", "chain"]


def split_channels(twin, torch, value: float) -> int:
    """Channels of the twin's first conv whose outputs on a constant image are not all one float64 value."""
    conv = next(m for m in twin.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        out = conv(torch.full((1, conv.in_channels, 28, 28), value, dtype=torch.float64))[0]
    k = conv.padding[0]  # outputs whose window lies inside the image (no padded input)
    inner = out[:, k:out.shape[1] - k, k:out.shape[2] - k] if k else out
    return int(sum(len(torch.unique(inner[c])) > 1 for c in range(inner.shape[0])))


@dataclasses.dataclass(frozen=True)
class UlpConfig:
    models: tuple[str, ...] = option(("lenet", "resnet18"), "max-pool models")
    n: int = option(16, "first N test images")
    weights: tuple[str, ...] = option(("trained", "random"), "trained (default checkpoints) and/or random (seed 0)")


class UlpSensitivityStudy(Study):
    name = "ulp-sensitivity"
    title = "Captum riemann_middle on max-pool nets: the twin's VG one float64 ulp from x"
    Config = UlpConfig
    doc, block = "docs/SERVICES.md", "ulp_sensitivity"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models} if "trained" in cfg.weights else {}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("lenet",), n=2, weights=("random",))

    def units(self, cfg):
        bad = set(cfg.weights) - {"trained", "random"}
        if bad:
            raise ValueError(f"weights {sorted(bad)}: choose trained and/or random")
        return [Unit({"model": m, "n": cfg.n, "weights": w}, (m,) if w == "trained" else (), label=f"{m} {w}")
                for w in cfg.weights for m in cfg.models]

    def run(self, unit, ctx):
        from ..services.external import CaptumIGService, require_extra

        torch = require_extra("torch")
        s = unit.settings
        name, n = s["model"], s["n"]
        ds = ctx.dataset()
        x = jnp.asarray(normalize(ds.test_images[:n], dtype=np.float64))
        y = jnp.asarray(ds.test_labels[:n])
        down = jnp.nextafter(x, jnp.zeros_like(x))
        up = jnp.nextafter(x, jnp.sign(x) * jnp.inf)
        background = float(np.ravel(normalize(np.zeros((1, 1), np.uint8), dtype=np.float64))[0])
        if s["weights"] == "random":
            v = cast_variables(init_variables(name, jax.random.PRNGKey(0)), jnp.float64)
            source = "random init (seed 0)"
        else:
            _, v32, meta = ctx.checkpoint(name)
            v = cast_variables(v32, jnp.float64)
            source = f"{meta['epochs']} epochs, test acc {100 * meta['test_accuracy']:.2f} %"
        svc = CaptumIGService(name, v, rule="riemann_middle")
        consts = [background * c for c in (1.0, 0.75, 0.5, 0.3, 1.0 + 2**-40)]
        split = [split_channels(svc.twin, torch, c) for c in consts]
        vg = svc.gradient(x, y)
        model = make_model(name)
        jvg = explain(VG(), model, v, x, y)
        plan = best_plan(svc)
        q = max(plan.queries, key=lambda q: q.scale)
        nodes, _ = svc.quadrature(q.steps)
        top = (q.scale * x) * nodes[-1]  # Captum: baseline + alpha * (input - baseline), zero baseline

        def stat(d):
            return [float(jnp.mean(d)), float(jnp.max(d))]

        return [{"model": name, "weights": source, "n": n, "split": split, "constants": len(consts),
                 "twin_down": stat(normalized_distance(vg, svc.gradient(down, y))),
                 "twin_up": stat(normalized_distance(vg, svc.gradient(up, y))),
                 "jax_down": stat(normalized_distance(jvg, explain(VG(), model, v, down, y))),
                 "plan": plan.name, "scale": float(q.scale), "node": float(nodes[-1]),
                 "twin_top": stat(normalized_distance(vg, svc.gradient(top, y))),
                 "bitwise": int(jnp.sum(jnp.all((top == x).reshape(n, -1), axis=1)))}]

    def markdown(self, rows, cfg):
        f = (lambda d: f"{d[0]:.1e} / {d[1]:.1e}")
        out = [f"float64, first {cfg.n} MNIST test images; distances are the paper's (mean / max over images)", "",
               "| model | weights | channels split by round-off on constant images (of the first conv's) | twin VG: x "
               "vs 1 ulp down | twin VG: x vs 1 ulp up | JAX VG: x vs 1 ulp down | riemann_middle plan, its largest "
               "point | twin VG: x vs that point | images where that point is x |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['weights']} | {', '.join(map(str, r['split']))} (of {r['constants']} "
                       f"constants) | {f(r['twin_down'])} | {f(r['twin_up'])} | {f(r['jax_down'])} | {r['plan']}: "
                       f"fl({r['node']:.9g} * fl({r['scale']:.9g} x)) | {f(r['twin_top'])} | {r['bitwise']} of "
                       f"{r['n']} |")
        return "\n".join(out)


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


@dataclasses.dataclass(frozen=True)
class OffRayConfig:
    n: int = option(64, "first N test images")
    stop: float = option(1e-30, "a chain ends when its points are this small (0: exactly at the baseline)")
    budget: int = option(20000, "search nodes per pixel value")


class OffRayChainsStudy(Study):
    name = "offray-chains"
    title = "Off-ray query chains against Captum riemann_middle: pixel values without a float64 preimage"
    Config = OffRayConfig
    doc, block = "docs/SERVICES.md", "offray_chains"

    def quick(self, cfg):
        return dataclasses.replace(cfg, n=4, budget=2000)

    def units(self, cfg):
        return [Unit({"n": cfg.n, "stop": cfg.stop, "budget": cfg.budget, "shifts": k}, label=f"{k} shifts")
                for k in (0, 1, 2)]

    def run(self, unit, ctx):
        s = unit.settings
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 100000))
        n = s["n"]
        x = normalize(ctx.dataset().test_images[:n], dtype=np.float64).reshape(n, -1)
        values = np.unique(x)
        top = {float(v): bool(preimages(float(v))) for v in values}
        ok = {v: t and chain(v, s["stop"], s["shifts"], [s["budget"]]) for v, t in top.items()}
        return [{**s, "values": len(values), "no_preimage": sum(not t for t in top.values()),
                 "images_with_dead_pixel": sum(any(not top[float(v)] for v in np.unique(r)) for r in x),
                 "chained_values": sum(ok.values()), "chained_images": sum(all(ok[float(v)] for v in np.unique(r))
                                                                          for r in x)}]

    def markdown(self, rows, cfg):
        r0 = rows[0]
        out = [f"{r0['values']} distinct pixel values in the first {r0['n']} test images; {r0['no_preimage']} have no "
               f"input y with fl(0.75 y) = value; images with such a pixel: {r0['images_with_dead_pixel']} of "
               f"{r0['n']}.", "", f"| shift blocks per level | values with a chain to \\|t\\| <= {cfg.stop:g} | "
               "images with a chain for every pixel |", "|---|---|---|"]
        out += [f"| {r['shifts']} | {r['chained_values']} of {r['values']} | {r['chained_images']} of {r['n']} |"
                for r in rows]
        return "\n".join(out)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    model: str = option("lenet", "model (default training config)")
    images: tuple[int, ...] = option((0, 5), "test images audited")
    grid: int = option(16384, "points of the kink scan")


class KinksAuditStudy(Study):
    name = "kinks-audit"
    title = "White-box audit of the kink location of the fixed-m kink recovery"
    Config = AuditConfig
    doc, block = "docs/SERVICES.md", "kinks_audit"

    def checkpoints(self, cfg):
        return {cfg.model: TrainConfig(model=cfg.model)}

    def quick(self, cfg):
        return dataclasses.replace(cfg, model="twolayer", images=(0,), grid=1024)

    def units(self, cfg):
        return [Unit({"model": cfg.model, "image": i, "grid": cfg.grid}, (cfg.model,), label=f"image {i}")
                for i in cfg.images]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, _ = ctx.checkpoint(s["model"])
        ds = ctx.dataset()
        x = np.asarray(normalize(ds.test_images[s["image"]:s["image"] + 1], dtype=np.float64))[0]
        rep = audit_kinks(model, cast_variables(v32, jnp.float64), x, int(ds.test_labels[s["image"]]), grid=s["grid"])
        return [{**s, **dataclasses.asdict(rep)}]

    def markdown(self, rows, cfg):
        out = ["| model | image | brackets | output values | gaps checked | gaps where the gradient still changes | "
               "changes between the jump pairs' windows: gaps, max | max \\|g\\| on the ray |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['image']} | {r['brackets']} | {r['values']} | {r['gaps']} | "
                       f"{len(r['bad_gaps'])} | {r['unread']}, {r['unread_max']:.3g} | {r['scale']:.3g} |")
        gaps = [(r["image"], g) for r in rows for g in r["bad_gaps"]]
        if gaps:
            out += ["", "| image | gap | max change | change of phi's slope | between the windows |", "|---|---|---|---|---|"]
            out += [f"| {i} | [{g[0]:.9g}, {g[1]:.9g}] | {g[2]:.3g} | {g[3]:.3g} | {g[4]:.3g} |" for i, g in gaps]
        return "\n".join(out)
