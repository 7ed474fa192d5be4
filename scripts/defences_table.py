"""docs/DEFENCES.md's tables: which changes to an IG service stop VG recovery, and what they cost honest users.

Usage:  python scripts/defences_table.py [--models twolayer,lenet,resnet18] [--n 32] [--n-resnet 8] [--n-random 8]
                                         [--out results/defences] [--docs docs/DEFENCES.md]

For each model (trained checkpoint in checkpoints/<model>), a float32 service (ours, riemann_right, m = 50,
zero baseline) behind each defence and strength; against it every attack that applies (the library's best
plan, the adaptive ones: averaging repeated queries, least squares over a grid of queries, finite differences
of the reported outputs, pairing answers of unknown random m, fixed-m jump decoding with a query cap per image); the recovery's distance to the float64 VG (mean, max) and
queries per image; and the explanation's utility for an honest user against the undefended IG: completeness
error, Spearman rank correlation, top-10 % overlap. Rows are written to <out>/rows.json after each one (atomic)
and a rerun skips the rows already there that were made with the same weights, images and settings (resume;
the others are recomputed); a Pareto figure per model goes to <out>/pareto_<model>.png.
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
from jaxrecover import services as S
from jaxrecover.fileio import atomic_savefig, atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)

NOISE = (1e-3, 1e-2, 1e-1)
SETTINGS_VERSION = 3  # bump when a defence or attack changes meaning: stored rows are then recomputed


def defences():
    """``[(name, strength, factory)]``: factory(make) -> defended service, ``make(**kw)`` builds the inner service."""
    out = [("none", "", lambda make: make())]
    out += [("round", f"{k} digits", lambda make, k=k: S.RoundAnswers(make(), k)) for k in (1, 2, 3, 4)]
    out.append(("round", "float16", lambda make: S.RoundAnswers(make(), "float16")))
    out += [("gaussian noise", f"{v:g} x max", lambda make, v=v: S.GaussianNoise(make(), v, seed=1)) for v in NOISE]
    out += [("laplace noise", f"{v:g} x max", lambda make, v=v: S.LaplaceNoise(make(), v, seed=1)) for v in NOISE]
    out.append(("fixed m", "50", lambda make: S.FixSteps(make(), 50)))
    out.append(("random m", "20..80", lambda make: S.RandomSteps(make(), 20, 80, seed=1)))
    out.append(("rule", "gausslegendre", lambda make: make(rule="gausslegendre")))
    out.append(("rule + fixed m", "gausslegendre, 50", lambda make: S.FixSteps(make(rule="gausslegendre"), 50)))
    out.append(("top-k", "10 %", lambda make: S.TopK(make(), 78)))
    out.append(("smoothgrad-ig", "8 x 0.15", lambda make: S.SmoothGradIG(make(), 8, 0.15, seed=1)))
    out.append(("expected gradients", "8 refs", lambda make: S.ExpectedGradients(make(random_baseline=True), 8)))
    return out


def attacks_for(name, model):
    """The attacks worth running against defence ``name`` (the best plan is tried everywhere)."""
    out = ["best plan"]
    if "noise" in name:
        out += ["averaged x16 + best plan", "lattice"]
    if name == "round":
        out.append("lattice")
    if name in ("none", "fixed m", "random m", "rule + fixed m"):
        out.append("outputs, finite diff.")
    if name in ("fixed m", "rule + fixed m") and model != "resnet18":
        # exact against float64 services (docs/SERVICES.md); against these float32 answers it can chase round-off
        # "jumps" for many minutes (uncapped it did not finish 8 twolayer images in 5 minutes), and on conv nets
        # a ray has thousands of real jumps (~10^5 queries per image): so each image gets FIXED_M_CAP queries.
        # Not on resnet18: lenet recovered 0 of 8 within the cap (12 minutes per row here), and resnet18's rays
        # cross as many boundaries as lenet's (docs/SERVICES.md) at several times the cost per query.
        out.append(FIXED_M)
    if name == "random m":
        out.append("random-m pairing")
    return out


FIXED_M_CAP = 2000
FIXED_M = f"fixed-m jump decoding (cap {FIXED_M_CAP} q)"


def fixed_m_capped(svc, inner, x, t):
    """:func:`R.recover_fixed_steps` image by image, each with at most ``FIXED_M_CAP`` queries (NaN past it)."""
    out = np.full(x.shape, np.nan)
    try:
        for i in range(x.shape[0]):
            inner.budget = inner.queries + FIXED_M_CAP
            try:
                out[i] = np.asarray(R.recover_fixed_steps(svc, x[i:i + 1], t[i:i + 1])[0][0], np.float64)
            except S.QueryBudgetExceeded:
                pass
    finally:
        inner.budget = None
    return out, np.asarray(x) != np.asarray(svc.fixed_baseline(x))


def run_attack(attack, svc, x, t, inner=None):
    """``(rec, mask)`` of ``attack`` on ``svc`` (``inner``: the undefended service inside, for per-image caps)."""
    if attack == FIXED_M:
        return fixed_m_capped(svc, inner, x, t)
    if attack == "best plan":
        return R.attack(svc, R.best_plan(svc), x, t)
    if attack == "averaged x16 + best plan":
        return R.attack(R.Averaged(svc, 16), R.best_plan(svc), x, t)
    if attack == "lattice":
        return R.lattice_attack(svc, x, t)[:2]
    if attack == "outputs, finite diff.":
        return R.recover_from_outputs(svc, x, t)[:2]
    if attack == "random-m pairing":  # the attacker knows the documented range, not the m of any answer
        return R.recover_random_steps(svc, x, t, low=svc.low, high=svc.high)[:2]
    raise ValueError(attack)


def reusable_rows(rows, model, key):
    """``(rows, n_stale)``: the stored rows without those of ``model`` made under another ``key`` (weights,
    images, settings); those are recomputed by the caller."""
    keep = [r for r in rows if r["model"] != model or r.get("key") == key]
    return keep, len(rows) - len(keep)


def utility(defended, plain, x, t, f):
    """Completeness error, Spearman and top-10 % overlap of the defended answers against the plain IG."""
    fx, fb = f
    comp = np.abs(np.asarray(defended, np.float64).reshape(x.shape[0], -1).sum(1) - (fx - fb)) / np.abs(fx - fb)
    d, p = jnp.asarray(defended, jnp.float64), jnp.asarray(plain, jnp.float64)
    return {"completeness_err": float(np.mean(comp)), "spearman": float(np.nanmean(np.asarray(jr.spearman(d, p)))),
            "top10_overlap": float(np.mean(np.asarray(jr.top_fraction_overlap(d, p, 0.1))))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="twolayer,lenet,resnet18")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-resnet", type=int, default=8)
    ap.add_argument("--out", default="results/defences")
    ap.add_argument("--docs", default=None, help="write the tables into this markdown file, between "
                    "<!-- defences_table:begin --> and <!-- defences_table:end -->")
    ap.add_argument("--n-random", type=int, default=8, help="examples for the random-m pairing attack (about "
                    "1,000 queries each; resnet18: 2)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.json")
    rows = _rows(path)
    ds = jr.load_dataset("mnist")
    command = "python scripts/defences_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    for name in args.models.split(","):
        _, v32, meta = jr.load_trained(f"checkpoints/{name}", model=name)
        n = args.n_resnet if name == "resnet18" else args.n
        model = jr.make_model(name)
        v = jr.cast_variables(v32, jnp.float32)
        x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.float32))
        t = jnp.asarray(ds.test_labels[:n])
        # a row is reused only for the same weights, images and settings (else it is recomputed)
        key = {"weights_sha256": meta["state_sha256"], "images_sha256": hashlib.sha256(np.asarray(x).tobytes())
               .hexdigest(), "dataset": ds.name, "N": n,
               "n_random": min(n, 2 if name == "resnet18" else args.n_random), "version": SETTINGS_VERSION}
        rows, stale = reusable_rows(rows, name, key)
        if stale:
            print(f"{name}: {stale} stored rows were made with other weights, images or settings: recomputed")
        done = {(r["defence"], r["strength"], r["attack"]) for r in rows if r["model"] == name}
        vg = jr.explain(jr.VG(), model, jr.cast_variables(v32, jnp.float64), x.astype(jnp.float64), t)
        base = jr.SimulatedIGService(model, v)
        plain = base(x, t)
        f = tuple(np.asarray(a, np.float64) for a in base.outputs(x, t))
        refs = jr.normalize(ds.train_images[:100], dtype=np.float32)
        built = []

        def make(rule="riemann_right", random_baseline=False):
            baseline = jr.explainers.RandomBaseline(refs, seed=1) if random_baseline else None
            built.append(jr.SimulatedIGService(model, v, rule=rule, baseline=baseline))
            return built[-1]

        tasks = [(d, s, fac, a) for d, s, fac in defences() for a in attacks_for(d, name)]
        for dname, strength, factory, attack in tqdm(tasks, desc=name, unit="row"):
            if (dname, strength, attack) in done:
                continue
            built.clear()
            svc = factory(make)
            inner = built[0]
            row = {"model": name, "N": n, "defence": dname, "strength": strength, "attack": attack,
                   **utility(svc(x, t), plain, x, t, f), "key": key}
            inner.reset_counters()
            # the slow attack runs on fewer images
            k = key["n_random"] if attack in ("random-m pairing", FIXED_M) else n
            t0 = time.time()
            try:
                rec, mask = run_attack(attack, svc, x[:k], t[:k], inner)
                d = np.asarray(jr.normalized_distance(jnp.asarray(rec, jnp.float64), vg[:k], mask))
                got = int(np.sum(np.isfinite(d)))
                row.update(N=k, mean=float(np.nanmean(d)) if got else float("nan"),
                           max=float(np.nanmax(d)) if got else float("nan"), queries=inner.queries // k,
                           status="ok" if got == k else f"recovered {got} of {k} (others: no answer, NaN)")
            except (ValueError, S.StepCountRefused, S.QueryBudgetExceeded) as e:
                row.update(mean=float("nan"), max=float("nan"), queries=inner.queries // k,
                           status=f"refused: {str(e).splitlines()[0][:120]}")
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            done.add((dname, strength, attack))
            atomic_write_text(path, json.dumps({"command": command, "rows": rows}, indent=1))
        pareto(rows, name, os.path.join(args.out, f"pareto_{name}.png"))
    text = markdown([r for r in rows if r["model"] in args.models.split(",")], command)
    print(text)
    if args.docs:
        write_docs(args.docs, text)


def pareto(rows, model, png):
    """Utility (Spearman against plain IG) vs the best attack's mean distance, one point per defence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = {}
    for r in rows:
        if r["model"] != model or not np.isfinite(r["mean"]):
            continue
        key = (r["defence"], r["strength"])
        if key not in best or r["mean"] < best[key]["mean"]:
            best[key] = r
    fig, ax = plt.subplots(figsize=(10, 5.5))
    markers = "osD^v<>pPX*h"
    for i, ((dname, strength), r) in enumerate(sorted(best.items())):
        ax.scatter(max(r["mean"], 1e-17), r["spearman"], s=40, marker=markers[i % len(markers)],
                   label=f"{dname} {strength} ({r['attack']})".strip())
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.axvline(np.sqrt(2), color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("best attack: mean distance to VG (sqrt 2 = chance)")
    ax.set_ylabel("utility: Spearman vs undefended IG")
    ax.set_title(f"{model}: defences (float32 service, riemann_right, m = 50)")
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=120)


def markdown(rows, command):
    cols = ["model", "N", "defence", "strength", "attack", "queries", "mean", "max", "completeness_err",
            "spearman", "top10_overlap", "status"]
    out = [f"Generated by `{command}` (rows: results/defences/rows.json).", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(
            f"{r[c]:.2e}" if c in ("mean", "max", "completeness_err") else
            f"{r[c]:.3f}" if c in ("spearman", "top10_overlap") else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def write_docs(path, text):
    """Replace the generated block of ``path`` (atomically)."""
    try:
        write_marked_block(path, "defences_table", text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _rows(path):
    """The stored rows (resume), or exit with one line when the file is damaged."""
    from jaxrecover.fileio import load_rows

    try:
        return load_rows(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

