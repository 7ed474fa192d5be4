"""docs/SERVICES.md's fixed-m table: exact recovery from the kinks of the output values (m = 50 fixed, float64).

Per model (default checkpoints), rule and range of test images (``first`` .. ``first + n - 1``): eq. (3) with
a = 0.98 against ``recover_fixed_steps_from_kinks`` (kinks located on a ``grid``-point scan, then jump pairs),
distance to the float64 VG, explanations, output values and gradient evaluations per image, and the
least-squares residuals. One unit per (model, rule, method, images): a long run (lenet: ~14,000 explanations
per image) resumes, and rows for other image ranges accumulate in ``rows.json`` (pooled in a second table).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from ..attacks import approx_plan, attack, recover_fixed_steps_from_kinks
from ..data import normalize
from ..engine import explain
from ..explainers import VG
from ..metrics import normalized_distance
from ..models import cast_variables
from ..services import SimulatedIGService
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["FixedKinksStudy"]

COLS = ["model", "rule", "images", "method", "kinks", "explanations", "values", "evaluations", "mean", "max",
        "failures>1e-6", "slope_res", "check_res", "wall_s"]
METHODS = ("eq. (3), a = 0.98", "kinks + jump pairs")


@dataclasses.dataclass(frozen=True)
class FixedKinksConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "models (default training configs)")
    n: int = option(2, "test images per row")
    first: int = option(0, "from this test image on (a row per range of images)")
    rules: tuple[str, ...] = option(("riemann_right", "gausslegendre"), "the services' rules")
    grid: int = option(16384, "points of the kink scan along the ray")


class FixedKinksStudy(Study):
    name = "fixed-kinks"
    title = "Fixed m = 50 (float64): exact VG from the kinks of the output values"
    Config = FixedKinksConfig
    doc, block = "docs/SERVICES.md", "fixed_kinks_table"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=1, rules=("riemann_right",), grid=2048)

    def units(self, cfg):
        return [Unit({"model": m, "rule": r, "method": meth, "N": cfg.n, "first": cfg.first, "grid": cfg.grid}, (m,),
                     label=f"{m} {r} {meth}") for m in cfg.models for r in cfg.rules for meth in METHODS]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, meta = ctx.checkpoint(s["model"])
        ds = ctx.dataset()
        v = cast_variables(v32, jnp.float64)
        sel = slice(s["first"], s["first"] + s["N"])
        x = jnp.asarray(normalize(ds.test_images[sel], dtype=np.float64))
        t = jnp.asarray(ds.test_labels[sel])
        vg = explain(VG(), model, v, x, t)
        svc = SimulatedIGService(model, v, rule=s["rule"], steps=50, fixed_steps=True)
        t0 = time.time()
        if s["method"] == METHODS[0]:
            rec, mask, _ = attack(svc, approx_plan(s["rule"], 50), x, t)
            d = np.asarray(normalized_distance(rec, vg, mask))
            row = {"kinks": "", "explanations": float(svc.queries // x.shape[0]), "values": 0.0,
                   "slope_res": "", "check_res": ""}
        else:
            rec, mask, rep = recover_fixed_steps_from_kinks(svc, x, t, grid=s["grid"], progress=ctx.progress)
            d = np.asarray(normalized_distance(rec, vg, mask))
            row = {"kinks": float(np.mean(rep.kinks)), "explanations": float(np.mean(rep.explanations)),
                   "values": float(np.mean(rep.values)), "slope_res": float(max(rep.slope_residual)),
                   "check_res": float(max(rep.check_residual)), "merged": int(sum(rep.merged)),
                   "searched": int(sum(rep.searched))}
        return [{**s, **row, "evaluations": int(svc.evaluations // x.shape[0]), "mean": float(d.mean()),
                 "max": float(d.max()), "per_image": d.tolist(), "failures>1e-6": int(np.sum(d > 1e-6)),
                 "epochs": meta["epochs"], "test_accuracy": meta["test_accuracy"],
                 "wall_s": round(time.time() - t0, 1)}]

    def markdown(self, rows, cfg):
        rows = sorted(rows, key=lambda r: (r["model"], r["rule"], r["method"] != METHODS[0], r["first"]))
        rows = [{**r, "images": f"{r['first']}-{r['first'] + r['N'] - 1}"} for r in rows]
        out = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
        for r in rows:
            out.append("| " + " | ".join(_fmt(c, r.get(c, "")) for c in COLS) + " |")
        pooled = {}
        for r in rows:  # every image of every row, once per (model, rule, method)
            imgs = pooled.setdefault((r["model"], r["rule"], r["method"]), {})
            imgs.update(zip(range(r["first"], r["first"] + r["N"]), r["per_image"]))
        if any(len(v) > max(r["N"] for r in rows if (r["model"], r["rule"], r["method"]) == k)
               for k, v in pooled.items()):
            out += ["", "Pooled over the rows (each image once):", "", "| model | rule | method | images | mean | max |",
                    "|---|---|---|---|---|---|"]
            for (model, rule, method), imgs in sorted(pooled.items()):
                d = np.asarray(list(imgs.values()))
                out.append(f"| {model} | {rule} | {method} | {len(d)} | {d.mean():.2e} | {d.max():.2e} |")
        return "\n".join(out)


def _fmt(col, v):
    if col in ("mean", "max", "slope_res", "check_res") and v != "":
        return f"{v:.2e}"
    if isinstance(v, float):
        return f"{v:.0f}" if col in ("kinks", "explanations", "values") or (col == "wall_s" and v >= 10) \
            else f"{v:.3g}"
    return str(v)
