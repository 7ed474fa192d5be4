"""docs/BOUNDARY.md's numbers: boundary search (reference PGD + CW against the exact facet search) and how far
boundary attributions are from the plain ones.

Usage:  python scripts/boundary_table.py [--models twolayer,lenet,lenet@checkpoints/lenet_adv1,resnet18] [--n 32]
                                         [--out results/boundary] [--docs docs/BOUNDARY.md]

For each model (trained checkpoint in checkpoints/<model>, or name@dir, e.g. an adversarially trained LeNet from
`python train.py --model lenet --adv-eps 1.0 --epochs 8 --out checkpoints/lenet_adv1`; float32) and the first --n
test images (--n-resnet for resnet18), explained at the model's prediction:
1. boundary search with the reference pipeline (jr.boundary_search methods pgd + cw: L2 PGD over the reference's
   eps list, 40 steps, first success per example; L2 Carlini-Wagner, 100 steps, kept within eps 1.0; the closer
   of the two) and with the exact facet search (methods facet): success rate, mean L2 distance in [0, 1] pixel
   units on the examples both found, wall seconds (after a first call that compiles);
2. on the examples the facet search found: the paper's distance between BSM and VG, and between BIG (IG from the
   boundary point, riemann_trapezoid, 10 steps) and IG (zero-image baseline, i.e. all pixels 0 before
   normalisation, same rule and steps);
   baseline sensitivity: BIG against IG from the zero, blurred and random baselines;
3. a figure of VG, IG (three baselines), BSM and BIG for four digits (<out>/maps_<model or dir name>.png);
4. leakage (--leak-models, first --n-leak images, float64): VG recovered from a BIG service with the
   baseline guessed as zeros, known (oracle), or estimated from d + 1 probes (--probe-models, --probes images;
   jr.attacks.recover_from_big).
Writes <out>/rows.json (git-ignored) and the <!-- boundary_table:begin/end --> block of --docs.
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
from jaxrecover import search as B
from jaxrecover.fileio import atomic_savefig, atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)


def timed_search(model, v, x, labels, methods):
    jax.block_until_ready(B.boundary_search(model, v, x, labels, methods=methods).point)  # compile (same shapes)
    t0 = time.time()
    res = B.boundary_search(model, v, x, labels, methods=methods)
    jax.block_until_ready(res.point)
    return res, time.time() - t0


def load(spec):
    """``name`` (checkpoints/<name>) or ``name@dir``: (label, model name, model, float32 variables, meta)."""
    name, _, path = spec.partition("@")
    _, v, meta = jr.load_trained(path or f"checkpoints/{name}", model=name)
    adv = float(meta.get("adv_eps") or 0.0)
    label = name if not path else f"{name} ({os.path.basename(os.path.normpath(path))}" + (
        f": L2-PGD trained, eps {adv:g})" if adv > 0 else ")")
    return label, (os.path.basename(os.path.normpath(path)) if path else name), name, jr.make_model(name), v, meta


def dist(a, b, ok):
    d = np.asarray(jr.normalized_distance(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))[ok]
    d = d[np.isfinite(d)]
    return {"mean": float(np.mean(d)), "max": float(np.max(d)), "n": int(d.size),
            "exact": float(np.mean(d <= 1e-6))} if d.size else None


def leakage(model, v, x, labels, probes: int):
    """Recovering VG from a BIG service (float64, facet search, riemann_trapezoid 10 steps, caller's m allowed):
    answers as they come, a zero-baseline guess, the true boundary point (oracle), and the point estimated from
    d + 1 probes (first ``probes`` images); the plan is exact_plan(riemann_trapezoid, 50) (scales 1 and 0.98)."""
    v64 = jr.cast_variables(v, jnp.float64)
    x = x.astype(jnp.float64)
    res = B.boundary_search(model, v64, x, labels, methods=("facet",))
    ok = np.asarray(res.success)
    vg = jr.explain(jr.VG(), model, v64, x, labels)
    big = jr.SimulatedIGService(model, v64, rule="riemann_trapezoid", steps=10,
                                baseline=jr.BoundaryBaseline(model, v64))
    plan = jr.exact_plan("riemann_trapezoid", 50)
    out = {"n": int(x.shape[0]), "plan": plan.name, "plan_queries": len(plan.queries)}
    out["as_is"] = dist(big(x, labels), vg, ok)
    for key, guess in (("zeros", jnp.zeros_like(x)), ("oracle", res.point)):
        g, _ = jr.attacks.attack(jr.AssumedBaseline(big, guess), plan, x, labels)
        out[key] = dist(g, vg, ok)
    if probes:
        big.reset_counters()
        g, _, pts, rep = jr.attacks.recover_from_big(big, x[:probes], labels[:probes], plan=plan, progress=True)
        out["probes"] = dist(g, vg[:probes], ok[:probes])
        out["probes"]["queries_per_image"] = big.queries / probes
        out["probes"]["point_error"] = float(np.max(np.abs(pts - np.asarray(res.point[:probes]))))
        out["probes"]["stable"] = int(np.sum(np.asarray(rep.misfit) < 1e-9))
    return out


def study(spec, ds, args):
    label, slug, name, model, v, meta = load(spec)
    n = args.n_resnet if name.startswith("resnet") else args.n
    box = B.InputBox.mnist()
    x = jnp.asarray(jr.normalize(ds.test_images[:n], dtype=np.float32))
    labels = jnp.argmax(model.batched(v, x), axis=1).astype(jnp.int32)
    ref, ref_s = timed_search(model, v, x, labels, ("pgd", "cw"))
    fac, fac_s = timed_search(model, v, x, labels, ("facet",))
    both = np.asarray(ref.success & fac.success)
    row = {"model": label, "weights_sha256": meta["state_sha256"], "n": n,
           "test_accuracy": meta.get("test_accuracy"), "adv_eps": float(meta.get("adv_eps") or 0.0),
           "ref_success": float(jnp.mean(ref.success)), "facet_success": float(jnp.mean(fac.success)),
           "common": int(both.sum()),
           "ref_distance": float(np.mean(np.asarray(ref.distance)[both]) / box.scale) if both.any() else None,
           "facet_distance": float(np.mean(np.asarray(fac.distance)[both]) / box.scale) if both.any() else None,
           "facet_distance_all": float(np.mean(np.asarray(fac.distance)[np.asarray(fac.success)]) / box.scale)
           if bool(fac.success.any()) else None,
           "ref_s": ref_s, "facet_s": fac_s,
           "ref_pgd_share": float(jnp.mean(ref.method[ref.success] == 0)) if bool(ref.success.any()) else None}
    ok = np.asarray(fac.success)
    zero = jnp.broadcast_to(jnp.asarray(jr.normalize(np.zeros((1, 28, 28), np.uint8), dtype=np.float32)), x.shape)
    noise = (np.random.default_rng(0).uniform(size=x.shape) - jr.data.MNIST_MEAN) / jr.data.MNIST_STD
    baselines = {"zero": zero, "blur": jr.BlurBaseline(sigma=5.0)(x), "random": jnp.asarray(noise, x.dtype)}
    # dense like BIG's default: the table in docs/BOUNDARY.md was computed before the native sparse path
    rule = jr.IG(steps=10, rule="riemann_trapezoid", sparse_path=False)
    vg = jr.explain(jr.VG(), model, v, x, labels)
    igs = {k: jr.explain(rule, model, v, x, labels, baseline=b) for k, b in baselines.items()}
    bsm = jr.boundary_attributions(jr.BSM(), model, v, x, labels, fac)
    big = jr.boundary_attributions(jr.BIG(), model, v, x, labels, fac)
    row["bsm_vg"] = dist(bsm, vg, ok)
    row["big_ig"] = dist(big, igs["zero"], ok)
    row["big_baselines"] = {k: dist(big, ig, ok) for k, ig in igs.items()}
    row["ig_zero_vs"] = {k: dist(igs["zero"], ig, ok) for k, ig in igs.items() if k != "zero"}
    figure(label, x[:4], {"VG": vg[:4], "IG (zero)": igs["zero"][:4], "IG (blur)": igs["blur"][:4],
                          "IG (random)": igs["random"][:4], "BSM": bsm[:4], "BIG": big[:4]},
           os.path.join(args.out, f"maps_{slug}.png"))
    if spec in args.leak_models.split(","):
        m = min(args.n_leak, n)
        row["leak"] = leakage(model, v, x[:m], labels[:m], args.probes if spec in args.probe_models.split(",") else 0)
    print(json.dumps(row, indent=1), flush=True)
    return row


def figure(name, x, maps, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = ["input", *maps]
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.8 * len(cols), 1.8 * len(x)), squeeze=False)
    for i in range(len(x)):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            img = np.asarray(x[i] if c == "input" else maps[c][i], np.float64)[..., 0]
            if c == "input":
                ax.imshow(img, cmap="gray")
            else:
                m = np.nanmax(np.abs(img)) if np.isfinite(img).any() else 1.0
                ax.imshow(img, cmap="bwr", vmin=-m, vmax=m)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c)
    fig.suptitle(f"{name}: boundary attributions (facet search)")
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=100)


def markdown(rows, command):
    f = (lambda v: "-" if v is None else f"{v:.3f}")
    d = (lambda v: "-" if v is None else f"{v['mean']:.3f} ({v['max']:.3f})")
    out = [f"Generated by `{command}` (rows: results/boundary/rows.json; seconds: wall time on this 2-core CPU, "
           "after compiling; distances: the paper's, mean (max) over the images the facet search found).", "",
           "| model | test acc | n | reference PGD+CW found | facet found | both | mean L2 (pixels) reference | "
           "facet | facet, all found | reference s | facet s | dist(BSM, VG) | dist(BIG, IG) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['test_accuracy']:.2%} | {r['n']} | {r['ref_success']:.0%} | "
                   f"{r['facet_success']:.0%} | {r['common']} | {f(r['ref_distance'])} | {f(r['facet_distance'])} | "
                   f"{f(r['facet_distance_all'])} | {r['ref_s']:.1f} | {r['facet_s']:.1f} | {d(r['bsm_vg'])} | "
                   f"{d(r['big_ig'])} |")
    out += ["", "Baseline sensitivity: the paper's distance of BIG to IG from other baselines (same rule and steps: "
            "riemann_trapezoid, 10), and of IG (zero) to IG from the others. Zero: the black image; blur: the input "
            "blurred (Gaussian, sigma 5 pixels); random: uniform noise in [0, 1] pixels (seed 0).", "",
            "| model | BIG vs IG zero | BIG vs IG blur | BIG vs IG random | IG zero vs IG blur | IG zero vs IG random |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        b, z = r["big_baselines"], r["ig_zero_vs"]
        out.append(f"| {r['model']} | {d(b['zero'])} | {d(b['blur'])} | {d(b['random'])} | {d(z['blur'])} | "
                   f"{d(z['random'])} |")
    leaks = [r for r in rows if "leak" in r]
    if leaks:
        out += ["", "Leakage: VG recovered from a BIG service (float64; its baseline: the facet search's nearest "
                "boundary point of each query; riemann_trapezoid, 10 steps, other step counts accepted), "
                f"plan {leaks[0]['leak']['plan']} ({leaks[0]['leak']['plan_queries']} queries per image). Mean (max) "
                "distance to VG; in brackets the share of images recovered to <= 1e-6.", "",
                "| model | n | answers as they come | zero baseline assumed | true boundary point (oracle) | "
                "point from d + 1 probes | probes: n, queries per image, images with stable probes |",
                "|---|---|---|---|---|---|---|"]
        for r in leaks:
            L = r["leak"]
            e = (lambda v: "-" if v is None else f"{v['mean']:.2g} ({v['max']:.2g}) [{v['exact']:.0%}]")
            p = L.get("probes")
            out.append(f"| {r['model']} | {L['n']} | {e(L['as_is'])} | {e(L['zeros'])} | {e(L['oracle'])} | "
                       f"{e(p) if p else '-'} | "
                       f"{'-' if not p else str(p['n']) + ', ' + format(p['queries_per_image'], '.0f') + ', ' + str(p['stable'])} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="twolayer,lenet")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-resnet", type=int, default=8, help="images for resnet18 (slow: about 1 s per image)")
    ap.add_argument("--leak-models", default="twolayer,lenet", help="models (as in --models) whose BIG leakage is measured")
    ap.add_argument("--n-leak", type=int, default=8, help="images of the leakage measurement")
    ap.add_argument("--probe-models", default="twolayer", help="models of the probe attack (d + 1 = 785 BIG "
                    "queries per image, each a boundary search: ~80 s per image on twolayer, hours on lenet)")
    ap.add_argument("--probes", type=int, default=4, help="images of the probe attack")
    ap.add_argument("--out", default="results/boundary")
    ap.add_argument("--docs", default=None, help="fill the <!-- boundary_table:begin/end --> block of this file")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    command = "python scripts/boundary_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    ds = jr.load_dataset("mnist")
    rows = [study(spec, ds, args) for spec in args.models.split(",")]
    atomic_write_text(os.path.join(args.out, "rows.json"), json.dumps({"command": command, "rows": rows}, indent=1))
    text = markdown(rows, command)
    print(text)
    if args.docs:
        write_marked_block(args.docs, "boundary_table", text)


if __name__ == "__main__":
    main()
