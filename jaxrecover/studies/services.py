"""docs/SERVICES.md: VG recovered from real IG services (Captum, PAIR saliency) and our own.

Per model (default checkpoints) and dtype, zero and black baselines: every service (ours riemann_right; Captum
under each of its rules; PAIR saliency), attacked with the naive exact plan for its rule at m = 50 and with the
service-aware best plan; distance to the float64 VG as the service's framework differentiates it (PyTorch for
Captum). Then the blurred input as baseline (the chain recovery, float64) and a fixed step count (m = 50,
float64: eq. (3), fixed-m jump decoding on ``jump_models``, finite differences of the reported outputs in
both dtypes). Needs the ``services`` extra (torch, captum, saliency).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from ..attacks import approx_plan, attack, best_plan, exact_plan, recover_fixed_steps, recover_from_outputs, \
    recover_input_baseline
from ..engine import explain
from ..explainers import VG, BlurBaseline
from ..metrics import normalized_distance
from ..models import cast_variables
from ..services import SimulatedIGService
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["ServicesStudy"]


@dataclasses.dataclass(frozen=True)
class ServicesConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet", "resnet18"), "models (default training configs)")
    n: int = option(64, "test images per model")
    n_resnet: int = option(8, "test images for resnet18")
    n_fixed: int = option(4, "test images of the fixed-m rows (0: none)")
    jump_models: tuple[str, ...] = option(("twolayer",), "models whose fixed-m rows include the jump decoding "
                                          "(lenet: hours per image on a CPU)")
    blur_sigma: float = option(5.0, "sigma (pixels) of the blurred-input baseline")
    rules: tuple[str, ...] = option((), "only the plan rows of services with these rules (empty: all)")


def _services(name, model, v, baseline):
    from ..services.external import CAPTUM_RULES, CaptumIGService, SaliencyIGService

    out = [("ours", SimulatedIGService(model, v, rule="riemann_right", baseline=baseline))]
    out += [("captum", CaptumIGService(name, v, rule=r, baseline=baseline)) for r in CAPTUM_RULES]
    out.append(("pair-saliency", SaliencyIGService(model, v, baseline=baseline)))
    return out


def reference_vg(label, name, model, v32, x, t, point=None):
    """float64 VG of the model as the service's framework differentiates it (PyTorch for Captum: where max-pool
    windows tie, PyTorch and JAX pick different inputs), at ``point`` (default ``x``)."""
    v = cast_variables(v32, jnp.float64)
    z = (x if point is None else point).astype(jnp.float64)
    if label == "captum":
        from ..services.external import CaptumIGService

        return CaptumIGService(name, v).gradient(z, t).astype(jnp.float64)
    return explain(VG(), model, v, z, t)


def _row(label, svc, plan, x, t, vg, extra):
    svc.reset_counters()
    t0 = time.time()
    rec, mask, _ = attack(svc, plan, x, t)
    d = np.asarray(normalized_distance(rec.astype(jnp.float64), vg, mask))
    return {"service": label, "rule": svc.rule, "plan": plan.name, "queries": svc.queries // x.shape[0],
            "evaluations": svc.evaluations // x.shape[0], "mean": float(np.mean(d)), "max": float(np.max(d)),
            "failures>1e-6": int(np.sum(d > 1e-6)), "wall_s": round(time.time() - t0, 1), **extra}


class ServicesStudy(Study):
    name = "services"
    title = "VG from real IG services (Captum, PAIR saliency, ours): plans, blurred baseline, fixed m"
    Config = ServicesConfig
    doc, block = "docs/SERVICES.md", "services_table"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=4, n_fixed=2, jump_models=())

    def units(self, cfg):
        out = []
        for m in cfg.models:
            n = cfg.n_resnet if m == "resnet18" else cfg.n
            for dtype in ("float64", "float32"):
                for base in ("zero", "black"):
                    out.append(Unit({"part": "plans", "model": m, "dtype": dtype, "baseline": base, "n": n,
                                     "rules": list(cfg.rules)}, (m,), label=f"{m} {dtype} {base}"))
            if cfg.rules:
                continue
            out.append(Unit({"part": "blur", "model": m, "n": n, "sigma": cfg.blur_sigma}, (m,), label=f"{m} blur"))
            if cfg.n_fixed:
                out.append(Unit({"part": "fixed", "model": m, "n": cfg.n_fixed, "jumps": m in cfg.jump_models},
                                (m,), label=f"{m} fixed m"))
        return out

    def run(self, unit, ctx):
        s = unit.settings
        return getattr(self, "_" + s["part"])(s, ctx)

    def _plans(self, s, ctx):
        name, n, dtype = s["model"], s["n"], np.dtype(s["dtype"])
        model, v, x, t = ctx.test_inputs(name, n, dtype)
        v32 = ctx.checkpoint(name)[1]
        vgs = {label: reference_vg(label, name, model, v32, x, t) for label in ("ours", "captum")}
        base = None if s["baseline"] == "zero" else jnp.full((28, 28, 1), float(x.min()), dtype)
        rows = []
        for label, svc in _services(name, model, v, base):
            if s["rules"] and svc.rule not in s["rules"]:
                continue
            vg = vgs.get(label, vgs["ours"])
            common = {"model": name, "dtype": dtype.name, "baseline": s["baseline"], "N": n}
            rows.append(_row(label, svc, exact_plan(svc.rule, 50), x, t, vg, common))
            rows.append(_row(label, svc, best_plan(svc), x, t, vg, common))
        return rows

    def _blur(self, s, ctx):
        from ..services.external import CaptumIGService, SaliencyIGService

        name, n = s["model"], s["n"]
        model, v, x, t = ctx.test_inputs(name, n, np.float64)
        v32 = ctx.checkpoint(name)[1]
        blur = BlurBaseline(s["sigma"])
        bx = blur(x)
        vgs = {label: (reference_vg(label, name, model, v32, x, t),  # VG(x), and VG where the services evaluate "x"
                       reference_vg(label, name, model, v32, x, t, point=bx + 1.0 * (x - bx)))
               for label in ("ours", "captum")}
        svcs = [("ours", SimulatedIGService(model, v, baseline=blur)),
                ("captum", CaptumIGService(name, v, rule="riemann_right", baseline=blur)),
                ("captum", CaptumIGService(name, v, rule="riemann_trapezoid", baseline=blur)),
                ("pair-saliency", SaliencyIGService(model, v, baseline=blur))]
        rows = []
        for label, svc in svcs:
            t0 = time.time()
            rec, mask, rep = recover_input_baseline(svc, x, t)
            vg, vg_point = vgs.get(label, vgs["ours"])
            d = np.asarray(normalized_distance(rec, vg, mask))
            dp = np.asarray(normalized_distance(rec, vg_point, mask))
            rows.append({"model": name, "dtype": "float64", "baseline": str(blur), "N": n, "service": label,
                         "rule": svc.rule, "plan": "chain", "queries": int(np.mean(rep.queries)),
                         "evaluations": int(np.mean(rep.evaluations)), "mean": float(d.mean()),
                         "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                         "mean_at_point": float(dp.mean()), "max_at_point": float(dp.max()),
                         "closed": int(sum(rep.closed)), "masked": float(np.mean(~np.asarray(mask))),
                         "wall_s": round(time.time() - t0, 1)})
        return rows

    def _fixed(self, s, ctx):
        """Fixed m = 50 on our service (float64, zero baseline): eq. (3), jump decoding, finite differences."""
        name, n = s["model"], s["n"]
        model, v, x, t = ctx.test_inputs(name, n, np.float64)
        v32 = ctx.checkpoint(name)[1]
        vg = explain(VG(), model, v, x, t)
        common = {"model": name, "dtype": "float64", "baseline": "zero", "N": n, "service": "ours, m fixed"}
        rows = []
        for rule in ("riemann_right", "gausslegendre"):
            svc = SimulatedIGService(model, v, rule=rule, steps=50, fixed_steps=True)
            rows.append(_row("ours, m fixed", svc, approx_plan(rule, 50), x, t, vg, common))
            if not s["jumps"]:
                continue
            svc.reset_counters()
            t0 = time.time()
            rec, mask, rep = recover_fixed_steps(svc, x, t, progress=ctx.progress)
            d = np.asarray(normalized_distance(rec, vg, mask))
            rows.append({**common, "rule": rule, "plan": "fixed-m jumps",
                         "queries": int(np.mean(rep.queries)), "evaluations": int(np.mean(rep.evaluations)),
                         "mean": float(d.mean()), "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                         "wall_s": round(time.time() - t0, 1), "breakpoints": float(np.mean(rep.breakpoints))})
        for dtype in (jnp.float64, jnp.float32):
            vd = cast_variables(v32, dtype)
            xd = x.astype(dtype)
            svc = SimulatedIGService(model, vd, steps=50, fixed_steps=True)
            t0 = time.time()
            rec, mask, rep = recover_from_outputs(svc, xd, t)
            d = np.asarray(normalized_distance(rec.astype(jnp.float64), vg, mask))
            rows.append({**common, "dtype": np.dtype(dtype).name, "rule": "any", "plan": "outputs, finite diff.",
                         "queries": int(np.mean(rep.queries)), "evaluations": svc.evaluations // n,
                         "mean": float(d.mean()), "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                         "wall_s": round(time.time() - t0, 1), "masked": float(np.mean(rep.unresolved))})
        return rows

    def markdown(self, rows, cfg):
        cols = ["model", "dtype", "baseline", "N", "service", "rule", "plan", "queries", "evaluations", "mean", "max",
                "failures>1e-6"]
        sections = [("Plans against each service", lambda r: r["plan"] != "chain" and r["service"] != "ours, m fixed",
                     cols),
                    ("The blurred input as baseline (chain recovery)", lambda r: r["plan"] == "chain",
                     cols + ["mean_at_point", "max_at_point", "closed", "masked"]),
                    ("Fixed step count (m = 50)", lambda r: r["service"] == "ours, m fixed",
                     cols + ["breakpoints", "masked", "wall_s"])]
        out = []
        for title, keep, cs in sections:
            sel = [r for r in rows if keep(r)]
            if not sel:
                continue
            out += ["", f"### {title}", "", "| " + " | ".join(cs) + " |", "|" + "---|" * len(cs)]
            for r in sel:
                out.append("| " + " | ".join(_fmt(c, r.get(c, "")) for c in cs) + " |")
        return "\n".join(out).lstrip("\n")


def _fmt(col, v):
    if col in ("mean", "max", "mean_at_point", "max_at_point") and v != "":
        return f"{v:.2e}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
