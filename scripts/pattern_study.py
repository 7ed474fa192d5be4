"""docs/PATTERN.md's numbers: signal-estimator quality per layer, image degradation, leakage towards VG.

Usage:  python scripts/pattern_study.py [--models twolayer,lenet] [--fit 6000] [--rows 20000] [--n 256]
                                        [--out results/patterns] [--docs docs/PATTERN.md]

For each model (trained checkpoint in checkpoints/<model>, float32 weights, float64 sums):
1. patterns fitted on the first --fit training images (jr.fit_patterns, one pass);
2. rho per layer (the paper's criterion, mean over the layer's units) for S_w, S_a and S_a+-, with v fitted on
   the training images after those (up to 2,000) and the correlation measured on the 2,000 test images (at most --rows
   rows each: conv layers give one row per output position);
3. image degradation on the first --n test images: the 49 patches of 4x4 pixels are replaced by the training
   mean in the order of their summed relevance (most relevant first) for PatternAttribution (S_a+-), VG, IG
   (riemann_right, m = 50) and gradient x input, and the explained class's logit is recorded after each patch;
4. leakage: the paper's distance between PatternAttribution / PatternNet and VG on those images.
Writes <out>/study.json and <out>/degradation_<model>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxrecover as jr
from jaxrecover.explainers import patterns as P
from jaxrecover.fileio import atomic_savefig, atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)

PATCH = 4


def rho_table(model, v, pats, ds, args):
    fit_imgs = jnp.asarray(jr.normalize(ds.train_images[args.fit:args.fit + 2000], dtype=np.float32))
    eval_imgs = jnp.asarray(jr.normalize(ds.test_images[:2000], dtype=np.float32))
    out = {}
    last = P.kernel_layers(model, v)[-1]
    for path in tqdm(P.kernel_layers(model, v), desc="rho per layer", unit="layer"):
        xf, w, b = P.layer_samples(model, v, fit_imgs, path, max_rows=args.rows, seed=0)
        xe, _, _ = P.layer_samples(model, v, eval_imgs, path, max_rows=args.rows, seed=1)
        flat = {e: np.asarray(P.flatten_kernel(p), np.float64) for e, p in pats[path].items()}
        row = {"d": int(w.shape[0]), "units": int(w.shape[1])}
        row["S_w"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["w"])))
        row["S_a"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["linear"])))
        if path == last:  # no ReLU after the last layer: S_a+- is S_a there
            row["S_a+-"] = row["S_a"]
        else:
            row["S_a+-"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["relu"], flat["relu_neg"], b)))
        out[path] = row
    return out


def degradation(model, v, pats, ds, args):
    x = jnp.asarray(jr.normalize(ds.test_images[:args.n], dtype=np.float32))
    t = jnp.asarray(ds.test_labels[:args.n])
    mean = jnp.asarray(jr.normalize(ds.train_images[:args.fit], dtype=np.float32).mean(0))
    methods = {"PatternAttribution": jr.PatternAttribution(pats), "VG": jr.VG(), "IG": jr.IG(steps=50)}
    maps = {k: np.asarray(jr.explain(e, model, v, x, t), np.float64) for k, e in methods.items()}
    maps["gradient x input"] = maps["VG"] * np.asarray(x, np.float64)
    grid = 28 // PATCH
    logit = jax.jit(jax.vmap(lambda z, c: model(v, z)[c]))
    curves = {}
    for name, m in maps.items():
        score = m.reshape(args.n, grid, PATCH, grid, PATCH).sum(axis=(2, 4)).reshape(args.n, -1)
        order = np.argsort(-score, axis=1)
        cur = np.asarray(x).copy()
        vals = [np.asarray(logit(jnp.asarray(cur), t))]
        for k in range(grid * grid):
            for i in range(args.n):
                r, c = divmod(int(order[i, k]), grid)
                cur[i, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = \
                    np.asarray(mean)[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            vals.append(np.asarray(logit(jnp.asarray(cur), t)))
        curves[name] = np.mean(np.stack(vals), axis=1).tolist()
    vg = jnp.asarray(maps["VG"])
    leak = {}
    for kind in ("relu", "linear"):
        for cls in (jr.PatternAttribution, jr.PatternNet):
            a = jr.explain(cls(pats, kind=kind), model, v, x, t).astype(jnp.float64)
            d = np.asarray(jr.normalized_distance(a, vg))
            leak[f"{cls.__name__} ({kind})"] = {"mean": float(np.nanmean(d)), "max": float(np.nanmax(d))}
    d = np.asarray(jr.normalized_distance(jnp.asarray(maps["gradient x input"]), vg))
    leak["gradient x input"] = {"mean": float(np.nanmean(d)), "max": float(np.nanmax(d))}
    return curves, leak


def figure(curves, model, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(np.arange(len(c)), c, label=name)
    ax.set_xlabel(f"{PATCH}x{PATCH} patches replaced by the mean (most relevant first)")
    ax.set_ylabel("explained logit (mean)")
    ax.set_title(f"{model}: image degradation (steeper = better ranking)")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=120)


def markdown(study, command):
    out = [f"Generated by `{command}` (results/patterns/study.json).", "",
           "rho (mean over each layer's units; 1 = no signal left in the distractor):", "",
           "| model | layer | inputs d | units | S_w | S_a | S_a+- | fit s |", "|---|---|---|---|---|---|---|---|"]
    for model, s in study.items():
        for layer, r in s["rho"].items():
            out.append(f"| {model} | {layer} | {r['d']} | {r['units']} | {r['S_w']:.3f} | {r['S_a']:.3f} | "
                       f"{r['S_a+-']:.3f} | {s['fit_s']:.1f} |")
    out += ["", "Distance to VG (the paper's metric, sqrt 2 = unrelated):", "",
            "| model | explanation | mean | max |", "|---|---|---|---|"]
    for model, s in study.items():
        for name, r in s["leak"].items():
            out.append(f"| {model} | {name} | {r['mean']:.3f} | {r['max']:.3f} |")
    out += ["", "Image degradation: the explained logit after removing k patches (mean over images):", "",
            "| model | method | k = 0 | 5 | 10 | 20 | 49 |", "|---|---|---|---|---|---|---|"]
    for model, s in study.items():
        for name, c in s["degradation"].items():
            out.append(f"| {model} | {name} | " + " | ".join(f"{c[k]:.2f}" for k in (0, 5, 10, 20, 49)) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="twolayer,lenet")
    ap.add_argument("--fit", type=int, default=6000)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out", default="results/patterns")
    ap.add_argument("--docs", default=None, help="fill the <!-- pattern_study:begin/end --> block of this file")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    command = "python scripts/pattern_study.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    ds = jr.load_dataset("mnist")
    if not 0 < args.fit < len(ds.train_images):
        raise SystemExit(f"--fit {args.fit}: the dataset has {len(ds.train_images)} training images and rho needs "
                         "some left after the fit set; pass a smaller --fit")
    study = {}
    for name in args.models.split(","):
        _, v, meta = jr.load_trained(f"checkpoints/{name}", model=name)
        model = jr.make_model(name)
        t0 = time.time()
        pats = P.fit_patterns(model, v, jnp.asarray(jr.normalize(ds.train_images[:args.fit], dtype=np.float32)))
        fit_s = time.time() - t0
        rho = rho_table(model, v, pats, ds, args)
        curves, leak = degradation(model, v, pats, ds, args)
        figure(curves, name, os.path.join(args.out, f"degradation_{name}.png"))
        study[name] = {"weights_sha256": meta["state_sha256"], "fit_s": fit_s, "rho": rho, "degradation": curves,
                       "leak": leak}
        atomic_write_text(os.path.join(args.out, "study.json"), json.dumps({"command": command, "study": study},
                                                                           indent=1))
    text = markdown(study, command)
    print(text)
    if args.docs:
        write_marked_block(args.docs, "pattern_study", text)


if __name__ == "__main__":
    main()
