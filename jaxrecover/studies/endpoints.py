"""docs/ENDPOINTS.md's table: real explanation endpoints attacked over HTTP, each started by the study itself.

One unit per (model, server). The unit starts the server on a free loopback port (TorchServe 0.12 with the
PyTorch twin of the checkpoint and VisionHandler's IG call, or ``jaxrecover serve`` under KServe 0.21), runs
:func:`jaxrecover.audit.audit_endpoint` against it exactly as ``jaxrecover audit URL`` does (probe,
identify, recover VG with the best method for what was identified, or with the ``assume``-d settings where
identification fails, on the first ``n`` MNIST test images),
stops the server by its process group and records, per image, the paper's distance to the served model's own
float32 autograd VG (the JAX model; TorchServe serves its PyTorch twin, equal to round-off), the queries and
the wall seconds. On the free-step KServe server of the TwoLayerNet it also extracts the net over HTTP
(:func:`jaxrecover.stealing.extract_two_layer` on the identified endpoint; fidelity as in docs/EXTRACTION.md).

Servers (``--servers``):

* ``torchserve/logits``, ``torchserve/top5``, ``torchserve/label``: gausslegendre, fixed 15 steps, float32,
  zero baseline (VisionHandler); ``/predictions`` answers raw logits, top-5 probabilities, or the label only.
* ``kserve/free``: gausslegendre 50 with a step count the client may choose (``--free-steps``);
  ``kserve/fixed``: gausslegendre, fixed 15 steps; ``kserve/round3``: the same with answers rounded to 3
  significant digits; ``kserve/budget``: the same with a per-API-key budget (``per_key`` explanations, then
  HTTP 429).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["EndpointsStudy", "SERVERS"]

SERVERS = ("torchserve/logits", "torchserve/top5", "torchserve/label", "kserve/free", "kserve/fixed",
           "kserve/round3", "kserve/budget")
_KSERVE_ARGS = {"free": ["--rule", "gausslegendre", "--steps", "50", "--free-steps"],
                "fixed": ["--rule", "gausslegendre", "--steps", "15"],
                "round3": ["--rule", "gausslegendre", "--steps", "15", "--defence", "round:3"],
                "budget": ["--rule", "gausslegendre", "--steps", "15"]}
_TOPK = {"logits": None, "top5": 5, "label": 0}


@dataclasses.dataclass(frozen=True)
class EndpointsConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "served checkpoints (default training configs)")
    servers: tuple[str, ...] = option(SERVERS, "server/variant, from: " + ", ".join(SERVERS))
    n: int = option(2, "MNIST test images the attacker recovers VG on (per server)")
    budget: int = option(4096, "explanations per image for the fixed-m recovery (issue 35's 2^12)")
    per_key: int = option(1000, "kserve/budget: explanations one API key gets before HTTP 429")
    extraction: bool = option(True, "extract the TwoLayerNet over HTTP from kserve/free")
    data: int = option(100, "training images the extraction's attacker holds")
    assume: str = option("gausslegendre/15", "settings the audit attacks with when identification fails "
                         "(jaxrecover audit --assume): TorchServe VisionHandler's; 'none' for no fallback")


def _server_command(server: str, model: str, per_key: int) -> str:
    kind, variant = server.split("/")
    if kind == "torchserve":
        return (f"build_archive({model!r}, ..., topk={_TOPK[variant]}); TorchServe(store, [{model!r}], ...) "
                "(jaxrecover.services.torchserve)")
    args = _KSERVE_ARGS[variant] + (["--budget-per-key", str(per_key)] if variant == "budget" else [])
    return f"jaxrecover serve checkpoints/{model} " + " ".join(args)


class EndpointsStudy(Study):
    name = "endpoints"
    title = "Real endpoints over HTTP (TorchServe, KServe): identification, VG recovery, extraction"
    Config = EndpointsConfig
    doc, block = "docs/ENDPOINTS.md", "endpoints_table"

    def checkpoints(self, cfg):
        return {m: TrainConfig(model=m) for m in cfg.models}

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), servers=("kserve/free", "kserve/fixed"), n=1,
                                   extraction=False)

    def units(self, cfg):
        for s in cfg.servers:
            if s not in SERVERS:
                raise ValueError(f"unknown server {s!r}; choose from: {', '.join(SERVERS)}")
        return [Unit({"model": m, "server": s, "n": cfg.n, "budget": cfg.budget,
                      "per_key": cfg.per_key if s == "kserve/budget" else None,
                      "extraction": bool(cfg.extraction and m == "twolayer" and s == "kserve/free"),
                      "data": cfg.data, "assume": cfg.assume}, (m,), label=f"{m} {s}")
                for m in cfg.models for s in cfg.servers]

    def run(self, unit, ctx):
        from ..audit import audit_endpoint, default_inputs
        from ..services.process import ServeProcess
        from ..services.torchserve import TorchServe, build_archive

        s = unit.settings
        kind, variant = s["server"].split("/")
        folder = ctx.checkpoint_folder(s["model"])
        x = default_inputs(s["n"])
        logs = ctx.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="jaxrecover-endpoints-") as tmp:
            if kind == "torchserve":
                _, v32, _ = ctx.checkpoint(s["model"])
                build_archive(s["model"], v32, Path(tmp) / "store", topk=_TOPK[variant])
                server = TorchServe(Path(tmp) / "store", [s["model"]], logs / f"torchserve-{s['model']}-{variant}")
            else:
                args = _KSERVE_ARGS[variant] + (["--budget-per-key", str(s["per_key"])] if variant == "budget" else [])
                server = ServeProcess(folder, args, log=logs / f"kserve-{s['model']}-{variant}.log")
            with server:
                start_s = time.perf_counter() - t0
                rep = audit_endpoint(server.url, s["model"], x, protocol=kind, budget=s["budget"],
                                     checkpoint=str(folder), api_key="audit", progress=ctx.progress,
                                     assume=s["assume"])
                ext = self._extract(server.url, s, ctx) if s["extraction"] else None
        i = rep.identification
        return [{"model": s["model"], "server": s["server"], "command": _server_command(s["server"], s["model"],
                                                                                         s["per_key"]),
                 "rule": i["rule"], "steps": i["steps"], "fixed_steps": i["fixed_steps"], "dtype": i["dtype"],
                 "baseline": i["baseline"], "identify_queries": i["queries"], "identify_note": i["note"],
                 "assumed": i["assumed"],
                 "images": [{k: r[k] for k in ("input", "target", "method", "status", "queries", "seconds",
                                               "error_estimate", "distance")} for r in rep.rows],
                 "requests": rep.requests, "retries": rep.retries, "bytes": rep.bytes, "audit_s": rep.seconds,
                 "startup_s": round(start_s, 1), "extraction": ext}]

    @staticmethod
    def _extract(url, s, ctx) -> dict:
        """``extract_two_layer`` over HTTP on the identified endpoint (float32 answers)."""
        import jax.numpy as jnp

        from ..attacks import identify_service
        from ..data import normalize
        from ..models import cast_variables
        from ..services.remote import RemoteIGService
        from ..stealing import ExtractionIncomplete, extract_two_layer, extraction_fidelity
        from .extraction import victim_params

        ds = ctx.dataset()
        _, v32, _ = ctx.checkpoint(s["model"])
        victim = victim_params(cast_variables(v32, jnp.float64))
        data = normalize(ds.train_images[-s["data"]:], dtype=np.float32)
        test = normalize(ds.test_images[:2000], dtype=np.float64)
        t0 = time.perf_counter()
        with RemoteIGService(url, s["model"], protocol="kserve", api_key="extraction") as r:
            svc = r.identified(identify_service(r, data[0], 0))
            try:
                ex, complete = extract_two_layer(svc, data, classes=10, progress=ctx.progress), True
            except ExtractionIncomplete as e:
                ex, complete = e.partial, False
            return {"queries": int(r.queries), "log2_queries": round(float(np.log2(max(r.queries, 1))), 2),
                    "units": ex.units, "complete": bool(complete and ex.complete),
                    "fidelity_test": extraction_fidelity(ex.params, victim, test), "requests": r.stats.requests,
                    "seconds": round(time.perf_counter() - t0, 1)}

    def markdown(self, rows, cfg):
        order = {s: i for i, s in enumerate(SERVERS)}
        out = ["Each row: one server started by the study on 127.0.0.1 (the command beside it), attacked over HTTP "
               "as `jaxrecover audit URL` does; distance: the paper's metric to the served model's own float32 "
               "autograd VG on MNIST test images 0..n-1 (mean / worst over the images; `-` where no VG came back); "
               "queries and seconds: per image, median. Identification: rule, m, fixed/free, baseline and the "
               "queries it spent; where it fails the audit attacks with the assumed settings (TorchServe VisionHandler's) "
               "and says so.", "",
               "| server | model | identified | distance (mean / worst) | recovered | queries / image | s / image | "
               "extraction of twolayer (queries, fidelity) | served by |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (order.get(r["server"], 99), r["model"] != "twolayer", r["model"])):
            m = f"{r['steps']} fixed" if r["fixed_steps"] else "free m"
            ident = (f"{r['rule']} {m}, {r['dtype']}, {r['baseline']} baseline ({r['identify_queries']} q)"
                     if r["rule"] else f"no ({r['identify_queries']} q)"
                     + (f"; attacked as {r['assumed']} (assumed)" if r.get("assumed") else ""))
            imgs = r["images"]
            d = [i["distance"] for i in imgs if i["distance"] == i["distance"]]  # NaN: no answer at all
            dist = f"{np.mean(d):.2e} / {max(d):.2e}" if d else "-"
            ok = f"{sum(i['status'] == 'recovered' for i in imgs)} of {len(imgs)}" if imgs else "-"
            statuses = sorted({i["status"] for i in imgs if i["status"] != "recovered"})
            if statuses:
                ok += " (" + "; ".join(statuses) + ")"
            q = f"{int(np.median([i['queries'] for i in imgs]))}" if imgs else "-"
            sec = f"{np.median([i['seconds'] for i in imgs]):.1f}" if imgs else "-"
            e = r.get("extraction")
            ext = (f"{e['queries']} (2^{e['log2_queries']}), {e['fidelity_test']:.1e}"
                   + ("" if e["complete"] else ", incomplete") if e else "")
            out.append(f"| {r['server']} | {r['model']} | {ident} | {dist} | {ok} | {q} | {sec} | {ext} | "
                       f"`{r['command']}` |")
        return "\n".join(out)
