"""docs/EXTRACTION.md's table: exact extraction of the trained TwoLayerNet (784-100-10) from IG answers.

Usage:  python scripts/extraction_table.py [--data 100] [--out results/extraction] [--docs docs/EXTRACTION.md]
                                           [--services ours64,ours32,captum64]

For each service (ours: float64 under every rule, float32 under riemann_right and gausslegendre; Captum's
IntegratedGradients on the PyTorch twin, float64, under its default gausslegendre and riemann_right), the
attacker holds ``--data`` training images (lines pass through them) and runs
``jr.extract_two_layer(service, data, classes=10)`` with the library's best plan for that service. Reported:
IG queries (log2 beside them), gradient evaluations the service spent, units found, units dead on the attacker's
data, lines, rejected crossings, and the fidelity ``max |logit difference| / max |logit|`` against the victim
(its float32 checkpoint weights, evaluated in float64) over the first 2,000 test images and over 10,000 random
images (uniform pixels, normalised like the data). Rows go to <out>/rows.json after each one (atomic); a rerun
reuses the rows made with the same weights, data and settings and recomputes the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover import stealing as ST
from jaxrecover.fileio import atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)

SETTINGS_VERSION = 2  # bump when the extraction changes meaning: stored rows are then recomputed
RULES64 = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def services(groups):
    """``[(label, dtype name, rule, factory(v64) -> service)]`` for the requested groups."""
    out = []
    if "ours64" in groups:
        out += [("ours", "float64", r, lambda v, r=r: jr.SimulatedIGService(jr.make_model("twolayer"), v, rule=r))
                for r in RULES64]
    if "ours32" in groups:
        out += [("ours", "float32", r, lambda v, r=r: jr.SimulatedIGService(
            jr.make_model("twolayer"), jr.cast_variables(v, jnp.float32), rule=r))
            for r in ("riemann_right", "gausslegendre")]
    if "captum64" in groups:
        def captum(v, r):
            from jaxrecover.services.external import CaptumIGService
            return CaptumIGService("twolayer", v, rule=r)
        out += [("captum", "float64", r, lambda v, r=r: captum(v, r)) for r in ("gausslegendre", "riemann_right")]
    return out


def victim_params(v):
    p = v["params"]
    return {"W1": np.asarray(p["Dense_0"]["kernel"], np.float64).T, "b1": np.asarray(p["Dense_0"]["bias"], np.float64),
            "W2": np.asarray(p["Dense_1"]["kernel"], np.float64).T, "b2": np.asarray(p["Dense_1"]["bias"], np.float64)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=int, default=100, help="training images the attacker holds")
    ap.add_argument("--out", default="results/extraction")
    ap.add_argument("--docs", default=None, help="write the table into this markdown file, between "
                    "<!-- extraction_table:begin --> and <!-- extraction_table:end -->")
    ap.add_argument("--services", default="ours64,ours32,captum64")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.json")
    rows = _rows(path)
    command = "python scripts/extraction_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    ds = jr.load_dataset("mnist")
    _, v32, meta = jr.load_trained("checkpoints/twolayer", model="twolayer")
    v64 = jr.cast_variables(v32, jnp.float64)
    victim = victim_params(v64)
    data = jr.normalize(ds.train_images[-args.data:], dtype=np.float64)  # the attacker's own images
    test = jr.normalize(ds.test_images[:2000], dtype=np.float64)
    noise = jr.normalize((np.random.default_rng(5).random((10000, 28, 28, 1)) * 255).astype(np.uint8),
                         dtype=np.float64)
    key = {"weights_sha256": meta["state_sha256"], "data_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
           "dataset": ds.name, "version": SETTINGS_VERSION}
    stale = [r for r in rows if r.get("key") != key]
    rows = [r for r in rows if r.get("key") == key]
    if stale:
        print(f"{len(stale)} stored rows were made with other weights, data or settings: recomputed")
    done = {(r["service"], r["dtype"], r["rule"]) for r in rows}
    todo = services(args.services.split(","))
    for label, dtype, rule, factory in tqdm(todo, desc="services", unit="row"):
        if (label, dtype, rule) in done:
            continue
        try:
            svc = factory(v64)
        except ImportError as e:
            print(f"skipped {label} {rule}: {e}")
            continue
        t0 = time.time()
        ex = ST.extract_two_layer(svc, data.astype(dtype), classes=10, progress=True)
        row = {"service": label, "dtype": dtype, "rule": rule, "plan": ex.plan, "queries": ex.queries,
               "log2_queries": round(float(np.log2(ex.queries)), 2), "evaluations": ex.evaluations,
               "units": ex.units, "dead": len(ex.dead), "lines": ex.lines, "rejected": ex.rejected,
               "fidelity_test": ST.extraction_fidelity(ex.params, victim, test),
               "fidelity_random": ST.extraction_fidelity(ex.params, victim, noise),
               "complete": ex.complete, "wall_s": round(time.time() - t0, 1), "key": key}
        rows.append(row)
        atomic_write_text(path, json.dumps({"command": command, "rows": rows}, indent=1))
    text = markdown(rows, command)
    print(text)
    if args.docs:
        try:
            write_marked_block(args.docs, "extraction_table", text)
        except ValueError as e:
            raise SystemExit(str(e)) from None


def markdown(rows, command):
    cols = ["service", "dtype", "rule", "plan", "queries", "log2_queries", "evaluations", "units", "dead", "lines",
            "rejected", "fidelity_test", "fidelity_random", "complete", "wall_s"]
    out = [f"Generated by `{command}` (rows: results/extraction/rows.json; wall time on this machine, 2 cores).", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.1e}" if c.startswith("fidelity") else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def _rows(path):
    """The stored rows (resume), or exit with one line when the file is damaged."""
    from jaxrecover.fileio import load_rows

    try:
        return load_rows(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

