"""docs/SERVICES.md's identification table: what :func:`jaxrecover.attacks.identify_service` names on float32
services with a fixed step count (the settings deployed services use), from answers alone.

Each unit is one (model, service, rule/m, baseline): the first ``n`` MNIST test images (normalised, float32),
one identification per image, each on a fresh service (its queries counted from zero). A row records what was
named (rule, m, fixed, baseline exact or its error), the queries and the seconds.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..attacks import identify_service
from ..data import normalize
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["IdentificationStudy"]

DEPLOYED = ("gausslegendre/15", "gausslegendre/50", "riemann_middle/50", "riemann_right/50", "saliency/25")


@dataclasses.dataclass(frozen=True)
class IdentificationConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "models (default training configs)")
    n: int = option(4, "first N test images per row")
    configs: tuple[str, ...] = option(DEPLOYED, "rule/m of the fixed-step services (TorchServe gausslegendre/15, "
                                                "Alibi gausslegendre/50, Azure riemann_middle/50, PAIR saliency/25)")
    baselines: tuple[str, ...] = option(("zero", "black"), "zero (TorchServe, Captum's default) and/or black "
                                                           "(the normalised background, a constant)")
    captum: tuple[str, ...] = option(("gausslegendre/15",), "rule/m also served by Captum on the PyTorch twin "
                                                            "(needs the services extra; empty: none)")


class IdentificationStudy(Study):
    name = "identification"
    title = "Service identification on float32 fixed-step services (rule, m, baseline) from answers alone"
    Config = IdentificationConfig
    doc, block = "docs/SERVICES.md", "identification"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), n=1, configs=("gausslegendre/15",),
                                   baselines=("zero",), captum=())

    def units(self, cfg):
        for c in (*cfg.configs, *cfg.captum):
            if "/" not in c or not c.split("/")[1].isdigit():
                raise ValueError(f"config {c!r}: write rule/m, e.g. gausslegendre/15")
        bad = set(cfg.baselines) - {"zero", "black"}
        if bad:
            raise ValueError(f"baselines {sorted(bad)}: choose zero and/or black")
        peers = [("ours", c) for c in cfg.configs] + [("captum", c) for c in cfg.captum]
        return [Unit({"model": m, "peer": peer, "config": c, "baseline": b, "n": cfg.n}, (m,),
                     label=f"{m} {peer} {c} {b}")
                for m in cfg.models for peer, c in peers for b in cfg.baselines]

    def run(self, unit, ctx):
        import jax.numpy as jnp

        from ..services import SimulatedIGService

        s = unit.settings
        rule, m = s["config"].split("/")[0], int(s["config"].split("/")[1])
        model, v, x, y = ctx.test_inputs(s["model"], s["n"], np.float32)
        black = float(np.ravel(normalize(np.zeros((1, 1), np.uint8), dtype=np.float32))[0])
        base = np.zeros(x.shape[1:]) if s["baseline"] == "zero" else np.full(x.shape[1:], black, np.float64)
        baseline = None if s["baseline"] == "zero" else jnp.asarray(base, jnp.float32)
        rows = []
        for i in range(s["n"]):
            if s["peer"] == "captum":
                from ..services.external import CaptumIGService

                svc = CaptumIGService(s["model"], v, rule=rule, steps=m, fixed_steps=True, baseline=baseline)
            else:
                svc = SimulatedIGService(model, v, rule=rule, steps=m, fixed_steps=True, baseline=baseline)
            t0 = time.perf_counter()
            idn = identify_service(svc, np.asarray(x[i], np.float64), int(y[i]))
            seconds = time.perf_counter() - t0
            b_err = float(np.nanmax(np.abs(idn.baseline - base))) if idn.baseline is not None else float("inf")
            rows.append({"model": s["model"], "peer": s["peer"], "config": s["config"], "baseline": s["baseline"],
                         "image": i, "named": None if idn.rule is None else f"{idn.rule}/{idn.steps}",
                         "fixed": bool(idn.fixed_steps), "dtype": idn.dtype, "baseline_error": b_err,
                         "queries": int(svc.queries), "seconds": seconds, "note": idn.note,
                         "equivalent": list(idn.equivalent)})
        return rows

    def markdown(self, rows, cfg):
        out = [f"float32 services with a fixed step count, first {cfg.n} MNIST test images (normalised); one "
               "identification per image from answers alone (rule, m, fixed/free, dtype, baseline). Right: "
               "the service's own rule/m named, fixed, float32, the baseline exact. Wrong: another rule/m named. "
               "Unidentified: nothing named.", "",
               "| model | service | rule/m | baseline | right | wrong | unidentified | queries (median / max) | "
               "seconds (median) |", "|---|---|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["model"], r["peer"], r["config"], r["baseline"]) for r in rows))
        for k in keys:
            rs = [r for r in rows if (r["model"], r["peer"], r["config"], r["baseline"]) == k]
            right = sum(r["named"] == r["config"] and r["fixed"] and r["dtype"] == "float32"
                        and r["baseline_error"] == 0.0 for r in rs)
            wrong = sum(r["named"] is not None and r["named"] != r["config"] for r in rs)
            none = sum(r["named"] is None for r in rs)
            q = [r["queries"] for r in rs]
            sec = [r["seconds"] for r in rs]
            out.append(f"| {k[0]} | {'Captum (twin)' if k[1] == 'captum' else 'ours'} | {k[2]} | {k[3]} | "
                       f"{right} of {len(rs)} | {wrong} | {none} | {int(np.median(q))} / {max(q)} | "
                       f"{np.median(sec):.1f} |")
        return "\n".join(out)
