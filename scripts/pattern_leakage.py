"""docs/PATTERN.md's leakage block: can an attacker get VG (or the weights) from PatternNet / PatternAttribution?

Usage:  python scripts/pattern_leakage.py [--models twolayer,lenet] [--fit 6000] [--n 256] [--public 256:2000]
                                          [--rconds 1e-10,1e-4,1e-2] [--out results/patterns] [--docs docs/PATTERN.md]

For each model (trained checkpoint in checkpoints/<model>, float32 weights; patterns fitted on the first --fit
training images, float64 sums - the operator's side):
1. Weights from published patterns: the first layer's kernel from its LINEAR pattern and the covariance of
   the layer's inputs (jr.explainers.kernel_from_pattern: C^+ a / (a^T C^+ a) = the kernel on the data's
   support), with C (a) the operator's own (the fit images: the identity, checked) and (b) the attacker's,
   estimated from public images (the test images --public, none of them explained below); C's pseudo-inverse cut
   at each relative eigenvalue --rconds (the attacker cannot tune it: it does not know the kernel). Per unit:
   cosine with the true kernel row, over all inputs and over the inputs that vary in the attacker's images.
2. VG from answers: on the first --n test images (their label explained), the paper's distance to VG of
   PatternNet / PatternAttribution answers as they come, and of PatternNet answers "whitened" with the
   attacker's pixel covariance (C^+ PN: undoes the first layer's data covariance, the only part of the
   pattern map the attacker can estimate without the weights; with the operator's C as the best case); against
   VG and against VG restricted to the pixels that vary in the attacker's images (what any data-driven estimate
   can reach).
Writes <out>/leakage.json (git-ignored) and the <!-- pattern_leakage:begin/end --> block of --docs.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxrecover as jr
from jaxrecover.explainers import patterns as P
from jaxrecover.fileio import atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)


def _cosines(a, b, mask=None):
    """Per-column cosine of ``a`` and ``b`` ``[d, u]`` (rows restricted to ``mask``)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return np.sum(a * b, axis=0) / np.where(den > 0, den, np.nan)


def _dist(a, b):
    d = np.asarray(jr.normalized_distance(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))
    return {"mean": float(np.nanmean(d)), "max": float(np.nanmax(d))}


def study(name, ds, args):
    _, v, meta = jr.load_trained(f"checkpoints/{name}", model=name)
    model = jr.make_model(name)
    fit = jnp.asarray(jr.normalize(ds.train_images[:args.fit], dtype=np.float32))
    lo, hi = (int(s) for s in args.public.split(":"))
    if lo < args.n:
        raise SystemExit(f"--public {args.public} overlaps the {args.n} explained test images; start it at >= {args.n}")
    public = jnp.asarray(jr.normalize(ds.test_images[lo:hi], dtype=np.float32))
    pats = P.fit_patterns(model, v, fit)
    first = P.kernel_layers(model, v)[0]
    a = P.flatten_kernel(np.asarray(pats[first]["linear"], np.float64))
    xo, w, _ = P.layer_samples(model, v, fit, first)
    xa, _, _ = P.layer_samples(model, v, public, first)
    varying = np.var(xa, axis=0) > 0
    out = {"weights_sha256": meta["state_sha256"], "layer": first, "d": int(w.shape[0]), "units": int(w.shape[1]),
           "varying": int(varying.sum())}
    out["kernel"] = []
    for who, x in (("operator", xo), ("attacker", xa)):
        cov = np.cov(x, rowvar=False, bias=True)
        for rcond in args.rconds:
            got = P.kernel_from_pattern(a, cov, rcond=rcond)
            row = {"C": who, "rcond": rcond}
            for where, mask in (("all", None), ("varying", varying)):
                c = _cosines(got, w, mask)
                row[where] = {"median": float(np.nanmedian(c)), "min": float(np.nanmin(c))}
            out["kernel"].append(row)
    # VG from answers
    x = jnp.asarray(jr.normalize(ds.test_images[:args.n], dtype=np.float32))
    t = jnp.asarray(ds.test_labels[:args.n])
    vg = np.asarray(jr.explain(jr.VG(), model, v, x, t), np.float64).reshape(args.n, -1)
    pix = np.asarray(public, np.float64).reshape(len(public), -1)
    covs = {"attacker": np.cov(pix, rowvar=False, bias=True),
            "operator": np.cov(np.asarray(fit, np.float64).reshape(len(fit), -1), rowvar=False, bias=True)}
    support = np.var(pix, axis=0) > 0
    inverses = {(who, rcond): np.linalg.pinv(cov, rcond=rcond, hermitian=True)  # once, for both pattern kinds
                for who, cov in covs.items() for rcond in args.rconds}
    vg_support = np.where(support, vg, 0.0)
    answers = {}
    for kind in ("linear", "relu"):
        pn = np.asarray(jr.explain(jr.PatternNet(pats, kind=kind), model, v, x, t), np.float64).reshape(args.n, -1)
        pa = np.asarray(jr.explain(jr.PatternAttribution(pats, kind=kind), model, v, x, t),
                        np.float64).reshape(args.n, -1)
        answers[f"PatternNet ({kind})"] = pn
        answers[f"PatternAttribution ({kind})"] = pa
        for (who, rcond), inverse in inverses.items():
            answers[f"C^+ PatternNet ({kind}), {who}'s C, rcond {rcond:g}"] = pn @ inverse
    out["vg"] = {k: {"vs VG": _dist(e, vg), "vs VG on varying pixels": _dist(e, vg_support)}
                 for k, e in answers.items()}
    out["vg_support_pixels"] = int(support.sum())
    return out


def markdown(results, command):
    lines = [f"Generated by `{command}` (results/patterns/leakage.json).", "",
             "Weights from the published linear patterns of the first layer (cosine with the true kernel per unit, "
             "median (min)):", "",
             "| model | layer | inputs (varying in public data) | C from | rcond | all inputs | varying inputs |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for k in r["kernel"]:
            lines.append(f"| {name} | {r['layer']} | {r['d']} ({r['varying']}) | {k['C']} | {k['rcond']:g} | "
                         + " | ".join(f"{k[w]['median']:.4f} ({k[w]['min']:.4f})" for w in ("all", "varying"))
                         + " |")
    lines += ["", "Distance to VG of the answers and of whitened PatternNet answers (paper's metric, mean (max); "
              "sqrt 2 = unrelated):", "", "| model | answer | vs VG | vs VG on the varying pixels |", "|---|---|---|---|"]
    for name, r in results.items():
        for k, d in r["vg"].items():
            a, b = d["vs VG"], d["vs VG on varying pixels"]
            lines.append(f"| {name} | {k} | {a['mean']:.3f} ({a['max']:.3f}) | {b['mean']:.3f} ({b['max']:.3f}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="twolayer,lenet")
    ap.add_argument("--fit", type=int, default=6000)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--public", default="256:2000", help="test-image range the attacker estimates covariances on")
    ap.add_argument("--rconds", default="1e-10,1e-4,1e-2", help="cut-offs of the covariances' pseudo-inverses")
    ap.add_argument("--out", default="results/patterns")
    ap.add_argument("--docs", default=None, help="fill the <!-- pattern_leakage:begin/end --> block of this file")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    command = "python scripts/pattern_leakage.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    args.rconds = [float(r) for r in args.rconds.split(",")]
    ds = jr.load_dataset("mnist")
    results = {name: study(name, ds, args) for name in args.models.split(",")}
    atomic_write_text(os.path.join(args.out, "leakage.json"),
                      json.dumps({"command": command, "results": results}, indent=1))
    text = markdown(results, command)
    print(text)
    if args.docs:
        write_marked_block(args.docs, "pattern_leakage", text)


if __name__ == "__main__":
    main()
