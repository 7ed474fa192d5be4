"""``jaxrecover audit URL``: what an explanation endpoint leaks, measured over HTTP, and what would stop it.

One pass, in the order an attacker works:

1. **probe**: one explanation (the endpoint is reachable, explains, and answers values of the declared dtype);
2. **identify** (:func:`~jaxrecover.attacks.identify_service`): rule, step count, fixed or free, baseline;
3. **recover VG** on a few inputs with the best method for what was identified: the exact plan
   (:func:`~jaxrecover.attacks.best_plan`) when the step count is free, the echo least squares
   (:func:`~jaxrecover.attacks.recover_fixed_steps_lsq`) when it is fixed; queries, wall seconds and the
   method's own error estimate per input, and, when the operator gives the served checkpoint
   (``--checkpoint``), the paper's distance to the model's own autograd VG;
4. **report**: what extraction would cost at the measured queries per gradient, and which settings of
   docs/DEFENCES.md stop the attack (a per-key budget below the measured queries per input; rounding; noise;
   random m), as a terminal table, markdown and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

__all__ = ["AuditReport", "audit_endpoint", "report_markdown"]

# queries of IG answers that extract_two_layer spent on the TwoLayerNet in float64 (docs/EXTRACTION.md):
# 2^11.8, at 2 answers per gradient (the exact plan): about 1,800 gradients
_EXTRACTION_GRADIENTS = 1800


@dataclasses.dataclass
class AuditReport:
    """What :func:`audit_endpoint` found (``rows``: one per input) and what it suggests."""

    url: str
    model: str
    protocol: str
    dtype: str
    identification: dict
    rows: list[dict]
    extraction: dict
    defences: list[str]
    queries: int
    requests: int
    retries: int
    bytes: int
    seconds: float
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)


def _targets(service, x, targets):
    if targets is not None:
        return np.asarray(targets, np.int64).reshape(-1)
    from .services import ServiceAnswerError
    from .services.remote import RemoteServiceError
    try:
        pred = service.predict(x)
    except (RemoteServiceError, ServiceAnswerError):  # an endpoint without predictions: explain class 0
        return np.zeros(len(x), np.int64)
    if isinstance(pred, list):  # top-k {class: prob}
        return np.asarray([int(max(p, key=p.get)) for p in pred], np.int64)
    if np.ndim(pred) == 1:  # labels only
        return np.asarray(pred, np.int64)
    return np.argmax(np.asarray(pred), axis=-1)


def assumed_settings(assume: str | None, protocol: str) -> tuple[str, int] | None:
    """``(rule, m)`` to attack with when identification fails: ``"RULE/M"``; ``"auto"``: TorchServe's
    VisionHandler settings (gausslegendre, 15 fixed steps) for the torchserve protocol, nothing otherwise;
    ``None`` / ``"none"``: nothing."""
    from .explainers import RULES

    if assume is None or assume == "none" or (assume == "auto" and protocol != "torchserve"):
        return None
    if assume == "auto":
        return "gausslegendre", 15
    rule, _, m = str(assume).partition("/")
    if rule not in RULES or not m.isdigit() or int(m) < 1:
        raise ValueError(f"--assume {assume!r}: write RULE/M with RULE one of {', '.join(sorted(RULES))} "
                         "(e.g. gausslegendre/15), or 'auto' / 'none'")
    return rule, int(m)


def audit_endpoint(url: str, model: str, x, *, protocol: str = "kserve", targets=None, budget: int = 2**12,
                   checkpoint: str | None = None, api_key: str | None = None, progress: bool = True,
                   dtype=jnp.float32, assume: str | None = "auto") -> AuditReport:
    """Audit the endpoint ``url`` / ``model`` on inputs ``x[N, H, W, C]`` (see the module docstring).

    ``assume`` (:func:`assumed_settings`): when identification names no rule, attack with these settings
    (fixed m, zero baseline) anyway, as an attacker who knows the serving stack would; the report says so."""
    from .attacks import RecoveryIncomplete, best_plan, identify_service, recover_fixed_steps_lsq
    from .attacks import attack as run_plan
    from .services import QueryBudgetExceeded
    from .services.remote import EndpointBudgetExceeded, RemoteIGService

    t_all = time.perf_counter()
    fallback = assumed_settings(assume, protocol)
    x = np.asarray(x, dtype)
    remote = RemoteIGService(url, model, protocol=protocol, dtype=dtype, api_key=api_key)
    with remote:
        t = _targets(remote, x, targets)
        remote(x[:1], t[:1])  # probe
        q_before = remote.queries
        try:
            idf = identify_service(remote, x[0], int(t[0]))
        except EndpointBudgetExceeded:  # the key's budget ran out while identifying: report it, do not crash
            from .attacks.identify import Identification
            spent = remote.queries - q_before
            idf = Identification(None, None, True, np.zeros(x.shape[1:], np.float64), float("nan"),
                                 np.dtype(dtype).name, {"until refused": spent}, {},
                                 f"the endpoint's budget (HTTP 429) ran out during identification after {spent} "
                                 "queries", ())
        ident = {"rule": idf.rule, "steps": idf.steps, "fixed_steps": idf.fixed_steps, "dtype": idf.dtype,
                 "baseline": ("zeros" if idf.baseline is not None and not np.any(idf.baseline)
                              else "constant %.6g" % float(np.ravel(idf.baseline)[0])
                              if idf.baseline is not None and np.ptp(idf.baseline) == 0 else "per pixel"),
                 "queries": int(sum(idf.queries.values())), "note": idf.note, "assumed": False}
        if not idf.identified and fallback is not None:
            idf = dataclasses.replace(idf, rule=fallback[0], steps=fallback[1], fixed_steps=True,
                                      baseline=np.zeros(x.shape[1:], np.float64),
                                      note=f"not identified ({idf.note}); assumed {fallback[0]}/{fallback[1]} "
                                           "fixed, zero baseline")
            ident["assumed"], ident["note"] = f"{fallback[0]}/{fallback[1]} fixed, zero baseline", idf.note
        ref = None
        if checkpoint is not None:
            from .engine import explain
            from .explainers import VG
            from .models import cast_variables, make_model
            from .training import load_trained
            name, variables, _ = load_trained(checkpoint)
            ref_model, ref_vars = make_model(name), cast_variables(variables, dtype)
            ref = lambda xi, ti: np.asarray(explain(VG(), ref_model, ref_vars, jnp.asarray(xi), jnp.asarray(ti)))  # noqa: E731
        rows = []
        if idf.identified:
            svc = remote.identified(idf)
            for i in range(len(x)):
                q0, t0 = remote.queries, time.perf_counter()
                method = "echo least squares" if idf.fixed_steps else "exact plan"
                try:
                    if idf.fixed_steps:
                        vg, mask, rep = recover_fixed_steps_lsq(svc, x[i:i + 1], t[i:i + 1], budget=budget,
                                                                progress=progress)
                        est = float(rep.error_estimate[0])
                    else:
                        vg, mask, rep = run_plan(svc, best_plan(svc), x[i:i + 1], t[i:i + 1])
                        est = float("nan")
                    status = "recovered"
                except RecoveryIncomplete as e:
                    vg, mask, rep = e.partial
                    est = float(rep.error_estimate[-1]) if getattr(rep, "error_estimate", None) else float("nan")
                    status = ("refused: the endpoint's budget (HTTP 429)"
                              if isinstance(e.cause, EndpointBudgetExceeded) else f"budget ran out ({budget} queries)")
                except (ValueError, QueryBudgetExceeded) as e:  # nothing for this input
                    vg, est = np.full(x[i:i + 1].shape, np.nan), float("nan")
                    status = ("refused: the endpoint's budget (HTTP 429)" if isinstance(e, EndpointBudgetExceeded)
                              else f"budget ran out ({budget} queries)" if isinstance(e, QueryBudgetExceeded)
                              else "method refused: " + str(e).splitlines()[0][:120])  # e.g. rounded answers
                row = {"input": i, "target": int(t[i]), "method": method, "status": status,
                       "queries": remote.queries - q0, "seconds": round(time.perf_counter() - t0, 2),
                       "error_estimate": est}
                if ref is not None and not np.isfinite(np.asarray(vg)).any():  # no answer for this input
                    row["distance"] = float("nan")
                elif ref is not None:
                    from .metrics import normalized_distance
                    v = np.where(np.isfinite(np.asarray(vg)), np.asarray(vg), 0.0)
                    row["distance"] = float(np.asarray(normalized_distance(jnp.asarray(ref(x[i:i + 1], t[i:i + 1])),
                                                                           jnp.asarray(v, dtype)))[0])
                rows.append(row)
        per_vg = float(np.median([r["queries"] for r in rows])) if rows else float("nan")
        extraction = {"gradients_needed (two-layer net, docs/EXTRACTION.md)": _EXTRACTION_GRADIENTS,
                      "queries_per_gradient (measured)": per_vg,
                      "queries_estimate": (None if not rows else int(round(per_vg * _EXTRACTION_GRADIENTS)))}
        defences = _defences(idf, rows)
        return AuditReport(url, model, protocol, np.dtype(dtype).name, ident, rows, extraction, defences,
                           remote.queries, remote.stats.requests, remote.stats.retries,
                           remote.stats.bytes_sent + remote.stats.bytes_received,
                           round(time.perf_counter() - t_all, 1),
                           note="" if idf.identified else "the endpoint was not identified: no recovery attempted")


def _defences(idf, rows) -> list[str]:
    out = []
    if rows:
        q = min(r["queries"] for r in rows)
        out.append(f"a per-key budget below {q} explanations (the fewest this audit needed for one input's VG) "
                   "stops single-input recovery by one key (jaxrecover serve --budget-per-key); it does not stop "
                   "many keys")
    if idf.identified and not idf.fixed_steps:
        out.append("fix the step count (the exact plan needs a step count of its choosing); a fixed m alone "
                   "does not stop the echo least squares (docs/SERVICES.md)")
    out.append("round answers to 2-3 significant digits: the recovered VG is then only as good as the rounding "
               "(twolayer: 4.6e-2 at 2 digits, 4.6e-3 at 3; docs/DEFENCES.md), at small utility cost")
    out.append("random step counts per query (--defence randomsteps:20-80) or answer noise: see docs/DEFENCES.md for "
               "the attacks that average them away and their query cost")
    return out


def report_markdown(r: AuditReport) -> str:
    """The report as markdown (the terminal prints the same)."""
    i = r.identification
    lines = [f"# Audit of {r.url} (model {r.model}, protocol {r.protocol})", "",
             (f"Identified: rule {i['rule']}, m {i['steps']}, {'fixed' if i['fixed_steps'] else 'free'} step count, "
              f"dtype {i['dtype']}, baseline {i['baseline']} ({i['queries']} queries; {i['note']})" if i["rule"]
              else f"Not identified ({i['queries']} queries): {i['note']}"), ""]
    if r.rows:
        cols = ["input", "target", "method", "status", "queries", "seconds", "error_estimate"] + (
            ["distance"] if "distance" in r.rows[0] else [])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in r.rows:
            lines.append("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c])
                                           for c in cols) + " |")
        lines.append("")
    e = r.extraction
    lines += [f"Extraction (two-layer net): about {e['queries_estimate']} explanation queries at "
              f"{e['queries_per_gradient (measured)']:g} per gradient.", "", "What would stop it:", ""]
    lines += [f"- {d}" for d in r.defences]
    lines += ["", f"Spent: {r.queries} explanations, {r.requests} HTTP requests ({r.retries} retried), "
              f"{r.bytes / 1e6:.1f} MB, {r.seconds:g} s."]
    if r.note:
        lines += ["", r.note]
    return "\n".join(lines) + "\n"


def write_report(r: AuditReport, out: str | Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.json`` in ``out`` (each written atomically)."""
    from .fileio import atomic_write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return (atomic_write_text(out / "report.md", report_markdown(r)),
            atomic_write_text(out / "report.json", r.to_json()))


def parse_url(url: str, model: str | None, protocol: str | None) -> tuple[str, str, str]:
    """``(base url, model, protocol)`` from an endpoint URL: ``.../v1/models/NAME:explain`` (kserve),
    ``.../explanations/NAME`` (torchserve) or a base URL with ``model`` and ``protocol`` given."""
    import re
    m = re.match(r"^(https?://[^/]+)/v1/models/([^/:]+)(:explain|:predict)?/?$", url)
    if m:
        return m.group(1), model or m.group(2), protocol or "kserve"
    m = re.match(r"^(https?://[^/]+)/(explanations|predictions)/([^/]+)/?$", url)
    if m:
        return m.group(1), model or m.group(3), protocol or "torchserve"
    if not re.match(r"^https?://[^/]+/?$", url):
        raise ValueError(f"cannot read an endpoint from {url!r}: give http://HOST:PORT/v1/models/NAME:explain, "
                         "http://HOST:PORT/explanations/NAME, or http://HOST:PORT with --model and --protocol")
    if not model:
        raise ValueError(f"{url} names no model: add --model NAME (or give the full explanation URL)")
    return url.rstrip("/"), model, protocol or "kserve"


def default_inputs(n: int) -> np.ndarray:
    """The first ``n`` MNIST test images (normalised, NHWC float32): the attacker's own inputs."""
    from .data import load_dataset, normalize
    return np.asarray(normalize(load_dataset("mnist").test_images[:n]), np.float32)
