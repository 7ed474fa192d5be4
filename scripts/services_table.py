"""docs/SERVICES.md's tables: recovery of VG from real IG services (Captum, PAIR saliency) and our own.

Usage:  python scripts/services_table.py [--n 64] [--n-resnet 8] [--n-fixed 4] [--out results/services.json]
Needs the 'services' extra (bash scripts/setup.sh services) and trained checkpoints in checkpoints/<model>
(python train.py --model M --out checkpoints/M). Prints markdown tables; writes the rows as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover.attacks.external import CAPTUM_RULES, CaptumIGService, SaliencyIGService
from jaxrecover.fileio import atomic_write_text
from jaxrecover.metrics import normalized_distance

jax.config.update("jax_enable_x64", True)


def services(name, v, dtype, baseline):
    model = jr.make_model(name)
    out = [("ours", jr.SimulatedIGService(model, v, rule="riemann_right", baseline=baseline))]
    out += [("captum", CaptumIGService(name, v, rule=r, baseline=baseline)) for r in CAPTUM_RULES]
    out.append(("pair-saliency", SaliencyIGService(model, v, baseline=baseline)))
    return out


def row(label, svc, plan, x, t, vg, extra=None):
    svc.reset_counters()
    t0 = time.time()
    rec, mask = R.attack(svc, plan, x, t)
    d = np.asarray(normalized_distance(rec.astype(jnp.float64), vg, mask))
    return {"service": label, "rule": svc.rule, "plan": plan.name, "queries": svc.queries // x.shape[0],
            "evaluations": svc.evaluations // x.shape[0], "mean": float(np.mean(d)), "max": float(np.max(d)),
            "failures>1e-6": int(np.sum(d > 1e-6)), "wall_s": round(time.time() - t0, 1), **(extra or {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--n-resnet", type=int, default=8)
    ap.add_argument("--n-fixed", type=int, default=4)
    ap.add_argument("--models", default="twolayer,lenet,resnet18")
    ap.add_argument("--out", default="results/services.json")
    args = ap.parse_args()
    ds = jr.load_dataset("mnist")
    rows = []
    for name in args.models.split(","):
        _, v32, _ = jr.load_trained(f"checkpoints/{name}", model=name)
        n = args.n_resnet if name == "resnet18" else args.n
        for dtype in (jnp.float64, jnp.float32):
            v = jr.cast_variables(v32, dtype)
            x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.dtype(dtype)))
            t = jnp.asarray(ds.test_labels[:n])
            vg = jr.explain(jr.VG(), jr.make_model(name), jr.cast_variables(v32, jnp.float64),
                            x.astype(jnp.float64), t)
            for bname, base in (("zero", None), ("black", jnp.full((28, 28, 1), float(x.min()), dtype))):
                for label, svc in services(name, v, dtype, base):
                    common = {"model": name, "dtype": np.dtype(dtype).name, "baseline": bname, "N": n}
                    naive = R.exact_plan(svc.rule, 50)
                    rows.append(row(label, svc, naive, x, t, vg, common))
                    rows.append(row(label, svc, R.best_plan(svc), x, t, vg, common))
                    print(rows[-2], "\n", rows[-1], flush=True)
        if name != "resnet18" and args.n_fixed:
            v = jr.cast_variables(v32, jnp.float64)
            x = jnp.asarray(jr.normalize(ds.test_images[:args.n_fixed], dtype=np.float64))
            t = jnp.asarray(ds.test_labels[:args.n_fixed])
            vg = jr.explain(jr.VG(), jr.make_model(name), v, x, t)
            for rule in ("riemann_right", "gausslegendre"):
                svc = jr.SimulatedIGService(jr.make_model(name), v, rule=rule, steps=50, fixed_steps=True)
                common = {"model": name, "dtype": "float64", "baseline": "zero", "N": args.n_fixed}
                rows.append(row("ours, m fixed", svc, R.approx_plan(rule, 50), x, t, vg, common))
                print(rows[-1], flush=True)
                svc.reset_counters()
                t0 = time.time()
                rec, mask, rep = R.recover_fixed_steps(svc, x, t, progress=True)
                d = np.asarray(normalized_distance(rec, vg, mask))
                rows.append({"service": "ours, m fixed", "rule": rule, "plan": "fixed-m jumps",
                             "queries": int(np.mean(rep.queries)), "evaluations": int(np.mean(rep.evaluations)),
                             "mean": float(d.mean()), "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                             "wall_s": round(time.time() - t0, 1), "breakpoints": float(np.mean(rep.breakpoints)),
                             **common})
                print(rows[-1], flush=True)
    atomic_write_text(args.out, json.dumps({"command": "python scripts/services_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "rows": rows}, indent=1))
    print(markdown(rows))


def markdown(rows):
    cols = ["model", "dtype", "baseline", "N", "service", "rule", "plan", "queries", "evaluations", "mean", "max",
            "failures>1e-6"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2e}" if c in ("mean", "max") else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
