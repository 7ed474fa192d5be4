"""docs/RESULTS.md's seed-spread table: the paper's Tables 1-4 over several training seeds.

The protocol of PAPER.md (riemann_right, m = 50, a = 0.98, logit of the true label, zero baseline, distances in
float64) on the first ``n`` test images, for each model, dtype and training seed (one checkpoint per seed, trained
with the default config and that seed). Reported per (experiment, model, dtype): seed 0's mean distance, and the
mean over the seeds of each seed's mean distance with its spread (sample standard deviation, min - max), beside
the paper's mean. A precision study should say how much of a number is the training run: a float64 recovery at
1e-14 whatever the seed is a property of the method; a Table 1 distance that moves by 0.05 between seeds is one of
the weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..data import normalize
from ..models import cast_variables
from ..protocol.experiments import PAPER, ProtocolConfig, experiments_for, run_protocol, summarize_results
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["ProtocolSeedsStudy"]

NAMES = {"table1": "Table 1: VG vs IG_50", "A": "Table 2: A, eq. (2)", "B": "Table 3: B, eq. (4)",
         "C": "Table 4: C, eq. (3)"}


@dataclasses.dataclass(frozen=True)
class SeedsConfig:
    models: tuple[str, ...] = option(("twolayer_nobias", "twolayer", "lenet_nobias", "lenet"), "models")
    dtypes: tuple[str, ...] = option(("float32", "float64"), "attack dtypes")
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds (one checkpoint each)")
    n: int = option(500, "first N test images")
    mode: str = option("faithful", "faithful (every IG query on its own) or shared (shared path points)")


def _label(model, seed):
    return model if seed == 0 else f"{model}-seed{seed}"


class ProtocolSeedsStudy(Study):
    name = "protocol-seeds"
    title = "The paper's Tables 1-4 over training seeds (mean and spread)"
    Config = SeedsConfig
    doc, block = "docs/RESULTS.md", "protocol_seeds"

    def checkpoints(self, cfg):
        return {_label(m, s): TrainConfig(model=m, seed=s) for m in cfg.models for s in cfg.seeds}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), seeds=(0, 1), n=16)

    def units(self, cfg):
        ProtocolConfig(mode=cfg.mode)  # validates the mode
        return [Unit({"model": m, "dtype": d, "seed": s, "n": cfg.n, "mode": cfg.mode}, (_label(m, s),),
                     label=f"{m} {d} seed {s}") for m in cfg.models for s in cfg.seeds for d in cfg.dtypes]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, meta = ctx.checkpoint(_label(s["model"], s["seed"]))
        ds = ctx.dataset()
        n = min(s["n"], len(ds.test_images))
        dtype = np.dtype(s["dtype"])
        pcfg = ProtocolConfig(experiments=experiments_for(s["model"]), mode=s["mode"])
        x = normalize(ds.test_images[:n], dtype)
        dists, seconds = run_protocol(model, cast_variables(v32, dtype), x, ds.test_labels[:n], pcfg,
                                      progress=ctx.progress, desc=unit.label)
        return [{**s, "n": n, "test_accuracy": meta["test_accuracy"], "results": summarize_results(dists),
                 "wall_s": round(seconds, 1)}]

    def markdown(self, rows, cfg):
        seeds = sorted({r["seed"] for r in rows})
        out = [f"Mean distance over the first {rows[0]['n'] if rows else cfg.n} test images per seed; across the "
               f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean, sample standard deviation, min - max.", "",
               "| experiment | model | dtype | seed 0 | mean over seeds | std over seeds | min - max | test acc. "
               "(min - max) | paper |", "|---|---|---|---|---|---|---|---|---|"]
        for exp in ("table1", "A", "B", "C"):
            for m in cfg.models:
                for d in cfg.dtypes:
                    sel = sorted((r for r in rows if (r["model"], r["dtype"]) == (m, d) and exp in r["results"]),
                                 key=lambda r: r["seed"])
                    if not sel:
                        continue
                    v = np.asarray([r["results"][exp]["mean"] for r in sel])
                    acc = [r["test_accuracy"] for r in sel]
                    first = next((r["results"][exp]["mean"] for r in sel if r["seed"] == 0), None)
                    paper = PAPER[exp].get(m)
                    out.append(f"| {NAMES[exp]} | {m} | {d} | {_g(first)} | {_g(v.mean())} | "
                               f"{_g(v.std(ddof=1)) if len(v) > 1 else '-'} | {_g(v.min())} - {_g(v.max())} | "
                               f"{100 * min(acc):.2f} - {100 * max(acc):.2f} % | {_g(paper[0]) if paper else '-'} |")
        out += ["", "Spread across seeds relative to the mean (std / mean, the largest over the models):", ""]
        for exp in ("table1", "A", "B", "C"):
            cells = []
            for d in cfg.dtypes:
                rel = []
                for m in cfg.models:
                    v = np.asarray([r["results"][exp]["mean"] for r in rows
                                    if (r["model"], r["dtype"]) == (m, d) and exp in r["results"]])
                    if len(v) > 1 and v.mean() > 0:
                        rel.append((v.std(ddof=1) / v.mean(), m, v.max()))
                if rel:
                    worst = max(rel)
                    cells.append(f"{d} {100 * worst[0]:.0f} % ({worst[1]}; largest mean {_g(worst[2])})")
            if cells:
                out.append(f"* {NAMES[exp]}: " + "; ".join(cells) + ".")
        return "\n".join(out)


def _g(v):
    return "-" if v is None else f"{v:.3g}"
