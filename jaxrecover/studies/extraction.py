"""docs/EXTRACTION.md's table: exact extraction of the trained TwoLayerNet (784-100-10) from IG answers.

For each service (ours: float64 under every rule, float32 under riemann_right and gausslegendre; Captum's
IntegratedGradients on the PyTorch twin, float64, under its default gausslegendre and riemann_right), the
attacker holds ``data`` training images (the last ones; lines pass through them) and runs
``stealing.extract_two_layer(service, data, classes=10)`` with the library's best plan for that service.
Reported: IG queries (log2 beside them), gradient evaluations the service spent, units found, units dead on the
attacker's data, lines, rejected crossings, and the fidelity ``max |logit difference| / max |logit|`` against
the victim (its float32 checkpoint weights, evaluated in float64) over the first 2,000 test images and over
10,000 random images (uniform pixels, normalised like the data).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from ..data import normalize
from ..models import cast_variables
from ..services import SimulatedIGService
from ..stealing import extract_two_layer, extraction_fidelity
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["ExtractionStudy", "DeepExtractionStudy", "extraction_services"]

RULES64 = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def extraction_services(groups):
    """``[(label, dtype name, rule)]`` of the requested groups (ours64, ours32, captum64)."""
    out = []
    if "ours64" in groups:
        out += [("ours", "float64", r) for r in RULES64]
    if "ours32" in groups:
        out += [("ours", "float32", r) for r in ("riemann_right", "gausslegendre")]
    if "captum64" in groups:
        out += [("captum", "float64", r) for r in ("gausslegendre", "riemann_right")]
    return out


def _service(label, dtype, rule, model, v64):
    if label == "captum":
        from ..services.external import CaptumIGService

        return CaptumIGService("twolayer", v64, rule=rule)
    return SimulatedIGService(model, cast_variables(v64, np.dtype(dtype)), rule=rule)


def victim_params(v):
    p = v["params"]
    return {"W1": np.asarray(p["Dense_0"]["kernel"], np.float64).T, "b1": np.asarray(p["Dense_0"]["bias"], np.float64),
            "W2": np.asarray(p["Dense_1"]["kernel"], np.float64).T, "b2": np.asarray(p["Dense_1"]["bias"], np.float64)}


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    data: int = option(100, "training images the attacker holds")
    services: tuple[str, ...] = option(("ours64", "ours32", "captum64"), "service groups: ours64, ours32, captum64")


class ExtractionStudy(Study):
    name = "extraction"
    title = "Exact extraction of the TwoLayerNet from IG answers (queries, fidelity)"
    Config = ExtractionConfig
    doc, block = "docs/EXTRACTION.md", "extraction_table"
    version = 2

    def checkpoints(self, cfg):
        return {"twolayer": TrainConfig(model="twolayer")}

    def quick(self, cfg):
        return dataclasses.replace(cfg, data=20, services=("ours64",))

    def units(self, cfg):
        return [Unit({"service": s, "dtype": d, "rule": r, "data": cfg.data}, ("twolayer",), label=f"{s} {d} {r}")
                for s, d, r in extraction_services(cfg.services)]

    def run(self, unit, ctx):
        s = unit.settings
        model, v32, _ = ctx.checkpoint("twolayer")
        ds = ctx.dataset()
        v64 = cast_variables(v32, jnp.float64)
        victim = victim_params(v64)
        data = normalize(ds.train_images[-s["data"]:], dtype=np.float64)  # the attacker's own images
        test = normalize(ds.test_images[:2000], dtype=np.float64)
        noise = normalize((np.random.default_rng(5).random((10000, 28, 28, 1)) * 255).astype(np.uint8),
                          dtype=np.float64)
        svc = _service(s["service"], s["dtype"], s["rule"], model, v64)
        t0 = time.time()
        ex = extract_two_layer(svc, data.astype(s["dtype"]), classes=10, progress=ctx.progress)
        return [{"service": s["service"], "dtype": s["dtype"], "rule": s["rule"], "plan": ex.plan,
                 "queries": ex.queries, "log2_queries": round(float(np.log2(ex.queries)), 2),
                 "evaluations": ex.evaluations, "units": ex.units, "dead": len(ex.dead), "lines": ex.lines,
                 "rejected": ex.rejected, "fidelity_test": extraction_fidelity(ex.params, victim, test),
                 "fidelity_random": extraction_fidelity(ex.params, victim, noise), "complete": ex.complete,
                 "wall_s": round(time.time() - t0, 1)}]

    def markdown(self, rows, cfg):
        cols = ["service", "dtype", "rule", "plan", "queries", "log2_queries", "evaluations", "units", "dead",
                "lines", "rejected", "fidelity_test", "fidelity_random", "complete", "wall_s"]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(f"{r[c]:.1e}" if c.startswith("fidelity") else str(r[c]) for c in cols)
                       + " |")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------- deep nets
DEEP_SERVICES = {"ours64": [("ours", "float64", "gausslegendre"), ("ours", "float64", "riemann_right")],
                 "captum64": [("captum", "float64", "gausslegendre")],
                 "ours32": [("ours", "float32", "gausslegendre")]}


#: Quoted from the papers (not measured here): (attack, net, parameters, queries, time, worst-case error).
ANCHORS = [
    ("Carlini, Jagielski, Mironov, CRYPTO 2020 (logits)", "MNIST, one hidden layer", "100,000", "2^21.5",
     "under an hour", "2^-25"),
    ("Carlini, Jagielski, Mironov, CRYPTO 2020 (logits)", "one hidden layer", "4,000", "2^18.5", "-", "2^-40.4"),
    ("Canales-Martinez et al., EUROCRYPT 2024 (logits)", "CIFAR-10 3072-256x8-10", "about 1.2 M", "-",
     "about 3 min per neuron", "-"),
    ("Foerster et al. 2024, arXiv 2406.10011 (logits)", "MNIST, two hidden layers", "16,721", "-", "98 min", "-"),
]
#: Parameters of the victims (with biases).
PARAMS = {"mlp2": "118,282", "mlp3": "59,210", "mlp2_nobias": "118,016", "mlp3_nobias": "59,008"}


@dataclasses.dataclass(frozen=True)
class DeepExtractionConfig:
    models: tuple[str, ...] = option(("mlp2", "mlp3"), "victims (fully connected ReLU nets: mlp2, mlp3, *_nobias)")
    data: int = option(100, "training images the attacker holds")
    services: tuple[str, ...] = option(("ours64", "captum64", "ours32"), "service groups: ours64, captum64, ours32")
    budget: int = option(2**17, "query budget per extraction (the issue's 2^17)")


class DeepExtractionStudy(Study):
    name = "extraction-deep"
    title = "Exact extraction of deep fully connected ReLU nets (mlp2, mlp3) from IG answers"
    Config = DeepExtractionConfig
    doc, block = "docs/EXTRACTION.md", "deep_extraction_table"
    version = 2

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("mlp2",), data=20, services=("ours64",))

    def units(self, cfg):
        return [Unit({"model": m, "service": s, "dtype": d, "rule": r, "data": cfg.data, "budget": cfg.budget},
                     (m,), label=f"{m} {s} {d} {r}")
                for m in cfg.models for g in cfg.services for s, d, r in DEEP_SERVICES[g]]

    def run(self, unit, ctx):
        from ..stealing import MLPExtractionIncomplete, extract_mlp, mlp_fidelity, mlp_params

        s = unit.settings
        model, v32, _ = ctx.checkpoint(s["model"])
        ds = ctx.dataset()
        v64 = cast_variables(v32, jnp.float64)
        victim = mlp_params(v64)
        data = normalize(ds.train_images[-s["data"]:], dtype=np.float64)
        test = normalize(ds.test_images[:2000], dtype=np.float64)
        noise = normalize((np.random.default_rng(5).random((10000, 28, 28, 1)) * 255).astype(np.uint8),
                          dtype=np.float64)
        if s["service"] == "captum":
            from ..services.external import CaptumIGService

            svc = CaptumIGService(s["model"], v64, rule=s["rule"], budget=s["budget"])
        else:
            svc = SimulatedIGService(model, cast_variables(v64, np.dtype(s["dtype"])), rule=s["rule"],
                                     budget=s["budget"])
        t0 = time.time()
        try:
            ex = extract_mlp(svc, data.astype(s["dtype"]), classes=10, progress=ctx.progress)
        except MLPExtractionIncomplete as e:
            ex = e.partial
        ok = ex.params is not None
        return [{"model": s["model"], "service": s["service"], "dtype": s["dtype"], "rule": s["rule"],
                 "queries": ex.queries, "log2_queries": round(float(np.log2(max(ex.queries, 1))), 2),
                 "widths": "-".join(map(str, ex.widths)),
                 "victim": "-".join(str(W.shape[0]) for W in victim["W"][:-1]),
                 "dead": "-".join(str(len(x)) for x in ex.dead), "segments": "-".join(map(str, ex.segments)),
                 "rejected": ex.rejected,
                 "fidelity_test": mlp_fidelity(ex.params, victim, test) if ok else float("nan"),
                 "fidelity_random": mlp_fidelity(ex.params, victim, noise) if ok else float("nan"),
                 "complete": ex.complete, "message": ex.message, "wall_s": round(time.time() - t0, 1)}]

    def markdown(self, rows, cfg):
        cols = ["model", "service", "dtype", "rule", "queries", "log2_queries", "victim", "widths", "dead",
                "segments", "rejected", "fidelity_test", "fidelity_random", "complete", "wall_s"]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(f"{r[c]:.1e}" if c.startswith("fidelity") else str(r[c]) for c in cols)
                       + " |")
        out += ["", "Beside the cryptanalytic anchors (their numbers QUOTED from the papers, logits-only attacks, their "
                "machines; ours: the float64 rows above, IG answers, this 2-core CPU):", "",
                "| attack | net | parameters | queries | time | worst error |", "|---|---|---|---|---|---|"]
        out += [f"| {a} | {n} | {p} | {q} | {t} | {e} |" for a, n, p, q, t, e in ANCHORS]
        for r in rows:
            if r["dtype"] == "float64" and r["complete"]:
                out.append(f"| jaxrecover extract_mlp ({r['service']} {r['rule']}) | {r['model']} 784-{r['victim']}-10 | "
                           f"{PARAMS.get(r['model'], '?')} | 2^{r['log2_queries']} | {r['wall_s']:.0f} s | "
                           f"{max(r['fidelity_test'], r['fidelity_random']):.1e} (relative) |")
        out += ["", "What stopped each run (the extraction's own message):", ""]
        out += [f"- {r['model']} {r['service']} {r['dtype']} {r['rule']}: {r['message']}" for r in rows]
        return "\n".join(out)
