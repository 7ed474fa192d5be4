"""docs/SERVICES.md's float32 fixed-m table: VG recovered from float32 services with a fixed step count (the
settings deployed services use: TorchServe gausslegendre 15, Alibi gausslegendre 50, Azure riemann_middle 50,
PAIR saliency 25), attributions only, zero baseline, by :func:`jaxrecover.attacks.recover_fixed_steps_lsq`.

One unit per (model, rule/m, range of test images, budget): each image on a fresh float32 service (queries
counted from zero); a row records the paper's distance to the service's own autograd VG (float32, the same
weights), the distance over the mask only, the error estimate the recovery reports, queries, breakpoints,
coordinates masked, whether the budget ran out, and the seconds. Rows for other image ranges accumulate in
``rows.json`` (the table pools them, each image once).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["FixedFloat32Study"]

DEPLOYED = ("gausslegendre/15", "gausslegendre/50", "riemann_middle/50", "riemann_right/50", "saliency/25")


@dataclasses.dataclass(frozen=True)
class FixedFloat32Config:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "models (default training configs)")
    n: int = option(10, "test images per unit")
    first: int = option(0, "from this test image on (rows of other ranges accumulate)")
    configs: tuple[str, ...] = option(DEPLOYED, "rule/m of the float32 fixed-step services")
    budgets: tuple[str, ...] = option(("twolayer=4096", "lenet=16384"),
                                      "answers per image, as model=budget (issue 35: 2^12 TwoLayerNet, 2^14 LeNet; "
                                      "other models: 16384)")


def _budget(cfg, model: str) -> int:
    for b in cfg.budgets:
        name, _, value = b.partition("=")
        if not value.isdigit():
            raise ValueError(f"budget {b!r}: write model=answers, e.g. lenet=16384")
        if name == model:
            return int(value)
    return 16384


class FixedFloat32Study(Study):
    name = "fixed-float32"
    title = "float32 services with a fixed step count: VG from attributions alone (echo least squares)"
    Config = FixedFloat32Config
    doc, block = "docs/SERVICES.md", "fixed_float32"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=1, configs=("gausslegendre/15",))

    def units(self, cfg):
        for c in cfg.configs:
            if "/" not in c or not c.split("/")[1].isdigit():
                raise ValueError(f"config {c!r}: write rule/m, e.g. gausslegendre/15")
        return [Unit({"model": m, "config": c, "first": cfg.first, "n": cfg.n, "budget": _budget(cfg, m)}, (m,),
                     label=f"{m} {c} images {cfg.first}-{cfg.first + cfg.n - 1}")
                for m in cfg.models for c in cfg.configs]

    def run(self, unit, ctx):
        import jax.numpy as jnp

        from ..attacks import RecoveryIncomplete, recover_fixed_steps_lsq
        from ..engine import explain
        from ..explainers import VG
        from ..metrics import normalized_distance
        from ..services import SimulatedIGService

        s = unit.settings
        rule, m = s["config"].split("/")[0], int(s["config"].split("/")[1])
        model, v, x, y = ctx.test_inputs(s["model"], s["n"], np.float32, first=s["first"])
        truth = explain(VG(), model, v, x, y)
        assert truth.dtype == jnp.float32 and x.dtype == jnp.float32
        rows = []
        for i in range(s["n"]):
            svc = SimulatedIGService(model, v, rule=rule, steps=m, fixed_steps=True)
            t0 = time.perf_counter()
            try:
                rec, mask, rep = recover_fixed_steps_lsq(svc, x[i:i + 1], y[i:i + 1], budget=s["budget"],
                                                         progress=ctx.progress)
                stopped = False
            except RecoveryIncomplete as e:
                rec, mask, rep = e.partial
                stopped = True
            seconds = time.perf_counter() - t0
            r64 = jnp.asarray(np.nan_to_num(np.asarray(rec, np.float64)))
            t64 = jnp.asarray(np.asarray(truth[i:i + 1], np.float64))
            dist = float(normalized_distance(r64, t64)[0])
            in_mask = float(normalized_distance(r64, t64, jnp.asarray(mask))[0]) if bool(mask.any()) else None
            rows.append({"model": s["model"], "config": s["config"], "image": s["first"] + i, "distance": dist,
                         "distance_in_mask": in_mask, "error_estimate": float(rep.error_estimate[0]),
                         "queries": int(svc.queries), "breakpoints": int(rep.breakpoints[0]),
                         "masked": int(rep.masked[0]), "coordinates": int(np.prod(x.shape[1:])),
                         "stopped": stopped, "budget": s["budget"], "seconds": round(seconds, 2)})
        return rows

    def markdown(self, rows, cfg):
        out = ["float32 services (zero baseline, fixed step count, attributions only), MNIST test images "
               "(normalised); distance: the paper's metric to the service's own float32 autograd VG over every "
               "coordinate; estimate: the error the recovery reports for itself. Images are pooled over the "
               "runs in rows.json, each once.", "",
               "| model | rule/m | images | mean | worst | estimate (worst) | masked coords (max) | queries "
               "(median / max) | budget | out of budget | seconds (median) |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        pooled: dict = {}
        for r in rows:
            pooled.setdefault((r["model"], r["config"]), {})[r["image"]] = r
        for (model, config), imgs in sorted(pooled.items(), key=lambda kv: (kv[0][0] != "twolayer", kv[0])):
            rs = [imgs[k] for k in sorted(imgs)]
            d = np.asarray([r["distance"] for r in rs])
            q = [r["queries"] for r in rs]
            out.append(f"| {model} | {config} | {len(rs)} | {d.mean():.2e} | {d.max():.2e} | "
                       f"{max(r['error_estimate'] for r in rs):.1e} | {max(r['masked'] for r in rs)} of "
                       f"{rs[0]['coordinates']} | {int(np.median(q))} / {max(q)} | {rs[0]['budget']} | "
                       f"{sum(r['stopped'] for r in rs)} | {np.median([r['seconds'] for r in rs]):.1f} |")
        return "\n".join(out)
