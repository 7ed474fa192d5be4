"""docs/SERVICES.md's tables: recovery of VG from real IG services (Captum, PAIR saliency) and our own.

Usage:  python scripts/services_table.py [--n 64] [--n-resnet 8] [--n-fixed 4] [--jump-models twolayer] [--docs docs/SERVICES.md]
        python scripts/services_table.py --rules riemann_left --merge --docs docs/SERVICES.md   # redo some rows
Needs the 'services' extra (bash scripts/setup.sh services) and trained checkpoints in checkpoints/<model>
(python train.py --model M --out checkpoints/M). Prints markdown tables; writes the rows as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover.services.external import CAPTUM_RULES, CaptumIGService, SaliencyIGService
from jaxrecover.fileio import atomic_write_text, write_marked_block
from jaxrecover.metrics import normalized_distance

jax.config.update("jax_enable_x64", True)


def services(name, v, dtype, baseline):
    model = jr.make_model(name)
    out = [("ours", jr.SimulatedIGService(model, v, rule="riemann_right", baseline=baseline))]
    out += [("captum", CaptumIGService(name, v, rule=r, baseline=baseline)) for r in CAPTUM_RULES]
    out.append(("pair-saliency", SaliencyIGService(model, v, baseline=baseline)))
    return out


def reference_vg(label, name, v32, x, t, point=None):
    """float64 VG of the model as the service's framework differentiates it (PyTorch for Captum: where max-pool
    windows tie, PyTorch and JAX pick different inputs), at ``point`` (default ``x``)."""
    v = jr.cast_variables(v32, jnp.float64)
    z = (x if point is None else point).astype(jnp.float64)
    if label == "captum":
        return CaptumIGService(name, v).gradient(z, t).astype(jnp.float64)
    return jr.explain(jr.VG(), jr.make_model(name), v, z, t)


def row(label, svc, plan, x, t, vg, extra=None):
    svc.reset_counters()
    t0 = time.time()
    rec, mask = R.attack(svc, plan, x, t)
    d = np.asarray(normalized_distance(rec.astype(jnp.float64), vg, mask))
    return {"service": label, "rule": svc.rule, "plan": plan.name, "queries": svc.queries // x.shape[0],
            "evaluations": svc.evaluations // x.shape[0], "mean": float(np.mean(d)), "max": float(np.max(d)),
            "failures>1e-6": int(np.sum(d > 1e-6)), "wall_s": round(time.time() - t0, 1), **(extra or {})}


def fixed_rows(name, v32, ds, n, jumps):
    """Fixed m = 50 on our service (float64, zero baseline): eq. (3), jump decoding, finite differences."""
    rows = []
    v = jr.cast_variables(v32, jnp.float64)
    x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.float64))
    t = jnp.asarray(ds.test_labels[:n])
    vg = jr.explain(jr.VG(), jr.make_model(name), v, x, t)
    common = {"model": name, "dtype": "float64", "baseline": "zero", "N": n, "service": "ours, m fixed"}
    for rule in ("riemann_right", "gausslegendre"):
        svc = jr.SimulatedIGService(jr.make_model(name), v, rule=rule, steps=50, fixed_steps=True)
        rows.append(row("ours, m fixed", svc, R.approx_plan(rule, 50), x, t, vg, common))
        print(rows[-1], flush=True)
        if not jumps:
            continue
        svc.reset_counters()
        t0 = time.time()
        rec, mask, rep = R.recover_fixed_steps(svc, x, t, progress=True)
        d = np.asarray(normalized_distance(rec, vg, mask))
        rows.append({**common, "rule": rule, "plan": "fixed-m jumps",
                     "queries": int(np.mean(rep.queries)), "evaluations": int(np.mean(rep.evaluations)),
                     "mean": float(d.mean()), "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                     "wall_s": round(time.time() - t0, 1), "breakpoints": float(np.mean(rep.breakpoints))})
        print(rows[-1], flush=True)
    for dtype in (jnp.float64, jnp.float32):
        vd = jr.cast_variables(v32, dtype)
        xd = x.astype(dtype)
        svc = jr.SimulatedIGService(jr.make_model(name), vd, steps=50, fixed_steps=True)
        t0 = time.time()
        rec, mask, rep = R.recover_from_outputs(svc, xd, t)
        d = np.asarray(normalized_distance(rec.astype(jnp.float64), vg, mask))
        rows.append({**common, "dtype": np.dtype(dtype).name, "rule": "any", "plan": "outputs, finite diff.",
                     "queries": int(np.mean(rep.queries)), "evaluations": svc.evaluations // n,
                     "mean": float(d.mean()), "max": float(d.max()), "failures>1e-6": int(np.sum(d > 1e-6)),
                     "wall_s": round(time.time() - t0, 1), "masked": float(np.mean(rep.unresolved))})
        print(rows[-1], flush=True)
    return rows


def blur_rows(name, v32, ds, n, sigma):
    """The blurred input as baseline (float64): the chain recovery on ours, Captum and PAIR."""
    rows = []
    v = jr.cast_variables(v32, jnp.float64)
    x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.float64))
    t = jnp.asarray(ds.test_labels[:n])
    model = jr.make_model(name)
    blur = jr.BlurBaseline(sigma)
    bx = blur(x)
    vgs = {label: (reference_vg(label, name, v32, x, t),  # VG(x), and VG where the services evaluate "x"
                   reference_vg(label, name, v32, x, t, point=bx + 1.0 * (x - bx))) for label in ("ours", "captum")}
    svcs = [("ours", jr.SimulatedIGService(model, v, baseline=blur)),
            ("captum", CaptumIGService(name, v, rule="riemann_right", baseline=blur)),
            ("captum", CaptumIGService(name, v, rule="riemann_trapezoid", baseline=blur)),
            ("pair-saliency", SaliencyIGService(model, v, baseline=blur))]
    for label, svc in svcs:
        t0 = time.time()
        rec, mask, rep = R.recover_input_baseline(svc, x, t)
        vg, vg_point = vgs.get(label, vgs["ours"])
        d = np.asarray(normalized_distance(rec, vg, mask))
        dp = np.asarray(normalized_distance(rec, vg_point, mask))
        rows.append({"model": name, "dtype": "float64", "baseline": str(blur), "N": n, "service": label,
                     "rule": svc.rule, "plan": "chain", "queries": int(np.mean(rep.queries)),
                     "evaluations": int(np.mean(rep.evaluations)), "mean": float(d.mean()), "max": float(d.max()),
                     "failures>1e-6": int(np.sum(d > 1e-6)), "mean_at_point": float(dp.mean()),
                     "max_at_point": float(dp.max()), "closed": int(sum(rep.closed)),
                     "masked": float(np.mean(~np.asarray(mask))), "wall_s": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--n-resnet", type=int, default=8)
    ap.add_argument("--n-fixed", type=int, default=4)
    ap.add_argument("--models", default="twolayer,lenet,resnet18")
    ap.add_argument("--jump-models", default="twolayer",
                    help="models whose fixed-m rows include the jump decoding (lenet: hours per image on a CPU)")
    ap.add_argument("--blur-sigma", type=float, default=5.0)
    ap.add_argument("--out", default="results/services.json")
    ap.add_argument("--checkpoints", default="checkpoints", help="trained models in DIR/<model>")
    ap.add_argument("--docs", default=None, help="also write the tables into this markdown file, between "
                    "<!-- services_table:begin --> and <!-- services_table:end -->")
    ap.add_argument("--rules", default=None,
                    help="only the plan rows of services with these rules, comma-separated (no blurred-baseline or "
                         "fixed-m rows)")
    ap.add_argument("--merge", action="store_true",
                    help="replace the matching rows of the existing --out file and keep the others")
    args = ap.parse_args()
    rules = None if args.rules is None else set(args.rules.split(","))
    ds = jr.load_dataset("mnist")
    rows = []
    for name in args.models.split(","):
        _, v32, _ = jr.load_trained(f"{args.checkpoints}/{name}", model=name)
        n = args.n_resnet if name == "resnet18" else args.n
        for dtype in (jnp.float64, jnp.float32):
            v = jr.cast_variables(v32, dtype)
            x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.dtype(dtype)))
            t = jnp.asarray(ds.test_labels[:n])
            vgs = {label: reference_vg(label, name, v32, x, t) for label in ("ours", "captum")}
            for bname, base in (("zero", None), ("black", jnp.full((28, 28, 1), float(x.min()), dtype))):
                for label, svc in services(name, v, dtype, base):
                    if rules is not None and svc.rule not in rules:
                        continue
                    vg = vgs.get(label, vgs["ours"])
                    common = {"model": name, "dtype": np.dtype(dtype).name, "baseline": bname, "N": n}
                    naive = R.exact_plan(svc.rule, 50)
                    rows.append(row(label, svc, naive, x, t, vg, common))
                    rows.append(row(label, svc, R.best_plan(svc), x, t, vg, common))
                    print(rows[-2], "\n", rows[-1], flush=True)
        if rules is not None:
            continue
        rows += blur_rows(name, v32, ds, n, args.blur_sigma)
        if args.n_fixed:
            rows += fixed_rows(name, v32, ds, args.n_fixed, name in args.jump_models.split(","))
    command = "python scripts/services_table.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v is not None and v is not False)
    if args.merge:
        command, rows = merge_rows(args.out, command, rows, args.docs)
    atomic_write_text(args.out, json.dumps({"command": command, "rows": rows}, indent=1))
    text = markdown(rows, command)
    print(text)
    if args.docs:
        write_docs(args.docs, text)


ROW_KEY = ("model", "dtype", "baseline", "service", "rule", "plan")


def merge_rows(path, command, new_rows, docs=None):
    """The rows of ``path`` with those matching a new row (same :data:`ROW_KEY`; a service's best plan matches its
    earlier best plan whatever its name) replaced in place, the new ones appended; both commands named.

    Where ``path`` is absent (it is git-ignored: a fresh checkout) the earlier rows are read back from the table
    in ``docs`` (its columns only)."""
    if os.path.exists(path) or docs is None:
        with open(path) as fh:
            old = json.load(fh)
    else:
        old = rows_from_docs(docs)
        print(f"{path} not found: merging into the {len(old['rows'])} rows of the table in {docs}", flush=True)

    def key(r):
        plan_row = r["plan"] != "chain" and r["service"] != "ours, m fixed"
        plan = ("ideal" if r["plan"] in ("paired-m50", "gl-midpoint") else "best") if plan_row else r["plan"]
        return tuple(r.get(k) for k in ROW_KEY[:-1]) + (plan,)

    fresh = {key(r): r for r in new_rows}
    rows = [fresh.pop(key(r), r) for r in old["rows"]] + list(fresh.values())
    return f"{old['command']}`, rows updated by `{command}", rows


def rows_from_docs(path):
    """The rows (and command) of the generated block of ``path``, as :func:`markdown` wrote them."""
    text = open(path).read()
    block = text[text.index("<!-- services_table:begin -->"):text.index("<!-- services_table:end -->")]
    command = block.split("Generated by `", 1)[1].rsplit("` (rows:", 1)[0]
    rows, cols = [], None
    for line in block.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "model":
            cols = cells
            continue
        r = dict(zip(cols, cells))
        for c in ("mean", "max", "mean_at_point", "max_at_point"):
            if r.get(c, "") != "":
                r[c] = float(r[c])
        rows.append({k: v for k, v in r.items() if v != ""})
    return {"command": command, "rows": rows}


def write_docs(path, text):
    """Replace the generated block of ``path`` (atomically)."""
    try:
        write_marked_block(path, "services_table", text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def markdown(rows, command=""):
    """The rows as markdown: service-aware plans, the blurred baseline, fixed m."""
    cols = ["model", "dtype", "baseline", "N", "service", "rule", "plan", "queries", "evaluations", "mean", "max",
            "failures>1e-6"]
    sections = [("Plans against each service", lambda r: r["plan"] not in ("chain",) and r["service"] != "ours, m fixed",
                 cols),
                ("The blurred input as baseline (chain recovery)", lambda r: r["plan"] == "chain",
                 cols + ["mean_at_point", "max_at_point", "closed", "masked"]),
                ("Fixed step count (m = 50)", lambda r: r["service"] == "ours, m fixed",
                 cols + ["breakpoints", "masked", "wall_s"])]
    out = [f"Generated by `{command}` (rows: results/services.json)." if command else ""]
    for title, keep, cs in sections:
        sel = [r for r in rows if keep(r)]
        if not sel:
            continue
        out += ["", f"### {title}", "", "| " + " | ".join(cs) + " |", "|" + "---|" * len(cs)]
        for r in sel:
            out.append("| " + " | ".join(_fmt(c, r.get(c, "")) for c in cs) + " |")
    return "\n".join(out)


def _fmt(col, v):
    if col in ("mean", "max", "mean_at_point", "max_at_point") and v != "":
        return f"{v:.2e}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    main()
