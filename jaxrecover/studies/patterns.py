"""docs/PATTERN.md: PatternNet / PatternAttribution - signal-estimator quality, image degradation, leakage.

Two studies, one per docs block:

* ``patterns``: per model (float32 weights, float64 sums) patterns fitted on the first ``fit`` training images;
  rho per layer (the paper's criterion, mean over the layer's units) for S_w, S_a and S_a+-, v fitted on the
  training images after those (up to 2,000) and measured on 2,000 test images (at most ``rows`` rows each);
  image degradation on the first ``n`` test images (the 49 4x4 patches replaced by the training mean, most
  relevant first) for PatternAttribution, VG, IG (riemann_right, m = 50), gradient x input; the paper's
  distance of PatternNet / PatternAttribution to VG.
* ``pattern-leakage``: can an attacker get the weights or VG from published patterns and answers: the first
  layer's kernel from its linear pattern and the input covariance (the operator's, and the attacker's from
  public test images, pseudo-inverse cut at each ``rconds``); the distance to VG of the answers and of
  PatternNet answers whitened with the attacker's pixel covariance.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


from ..engine import explain
from ..data import normalize
from ..explainers import IG, VG, PatternAttribution, PatternNet
from ..explainers import patterns as P
from ..fileio import atomic_savefig
from ..metrics import normalized_distance
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["PatternStudy", "PatternLeakageStudy", "PATTERN_CHECKPOINTS"]

PATCH = 4

#: The weights docs/PATTERN.md was made with: a 10-epoch TwoLayerNet, LeNet at its default epochs.
PATTERN_CHECKPOINTS = {"twolayer": TrainConfig(model="twolayer", epochs=10), "lenet": TrainConfig(model="lenet")}


@dataclasses.dataclass(frozen=True)
class PatternConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "models (checkpoints: PATTERN_CHECKPOINTS)")
    fit: int = option(6000, "training images the patterns are fitted on")
    rows: int = option(20000, "at most this many rows per layer for rho (conv layers: one per position)")
    n: int = option(256, "test images explained (degradation, distance to VG)")


def _checkpoints(models):
    unknown = [m for m in models if m not in PATTERN_CHECKPOINTS]
    if unknown:
        raise ValueError(f"models {unknown}: this study declares checkpoints for {sorted(PATTERN_CHECKPOINTS)}")
    return {m: PATTERN_CHECKPOINTS[m] for m in models}


def _dist(a, b) -> dict:
    d = np.asarray(normalized_distance(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))
    return {"mean": float(np.nanmean(d)), "max": float(np.nanmax(d))}


class PatternStudy(Study):
    name = "patterns"
    title = "PatternNet/PatternAttribution: rho per layer, image degradation, distance to VG"
    Config = PatternConfig
    doc, block = "docs/PATTERN.md", "pattern_study"
    out = "results/patterns"

    def checkpoints(self, cfg):
        return _checkpoints(cfg.models)

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), fit=1000, rows=2000, n=16)

    def units(self, cfg):
        return [Unit({"model": m, "fit": cfg.fit, "rows": cfg.rows, "n": cfg.n}, (m,), label=m) for m in cfg.models]

    def run(self, unit, ctx):
        s = unit.settings
        ds = ctx.dataset("mnist")
        if not 0 < s["fit"] < len(ds.train_images):
            raise ValueError(f"fit={s['fit']}: the dataset has {len(ds.train_images)} training images and rho needs "
                             "some left after the fit set; pass a smaller --fit")
        model, v, _ = ctx.checkpoint(s["model"])
        t0 = time.time()
        pats = P.fit_patterns(model, v, jnp.asarray(normalize(ds.train_images[:s["fit"]], dtype=np.float32)),
                              progress=ctx.progress)
        fit_s = time.time() - t0
        rho = self._rho(model, v, pats, ds, s, ctx.progress)
        curves, leak = self._degradation(model, v, pats, ds, s)
        self._figure(curves, s["model"], ctx.out / f"degradation_{s['model']}.png")
        return [{"model": s["model"], "fit_s": fit_s, "rho": rho, "degradation": curves, "leak": leak}]

    @staticmethod
    def _rho(model, v, pats, ds, s, progress):
        fit_imgs = jnp.asarray(normalize(ds.train_images[s["fit"]:s["fit"] + 2000], dtype=np.float32))
        eval_imgs = jnp.asarray(normalize(ds.test_images[:2000], dtype=np.float32))
        out = {}
        layers = P.kernel_layers(model, v)
        for path in tqdm(layers, desc="rho per layer", unit="layer", disable=not progress, leave=False):
            xf, w, b = P.layer_samples(model, v, fit_imgs, path, max_rows=s["rows"], seed=0)
            xe, _, _ = P.layer_samples(model, v, eval_imgs, path, max_rows=s["rows"], seed=1)
            flat = {e: np.asarray(P.flatten_kernel(p), np.float64) for e, p in pats[path].items()}
            row = {"d": int(w.shape[0]), "units": int(w.shape[1])}
            row["S_w"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["w"])))
            row["S_a"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["linear"])))
            if path == layers[-1]:  # no ReLU after the last layer: S_a+- is S_a there
                row["S_a+-"] = row["S_a"]
            else:
                row["S_a+-"] = float(np.mean(P.layer_signal_quality(xf, xe, w, flat["relu"], flat["relu_neg"], b)))
            out[path] = row
        return out

    @staticmethod
    def _degradation(model, v, pats, ds, s):
        n = s["n"]
        x = jnp.asarray(normalize(ds.test_images[:n], dtype=np.float32))
        t = jnp.asarray(ds.test_labels[:n])
        mean = np.asarray(normalize(ds.train_images[:s["fit"]], dtype=np.float32).mean(0))
        methods = {"PatternAttribution": PatternAttribution(pats), "VG": VG(), "IG": IG(steps=50)}
        maps = {k: np.asarray(explain(e, model, v, x, t), np.float64) for k, e in methods.items()}
        maps["gradient x input"] = maps["VG"] * np.asarray(x, np.float64)
        grid = 28 // PATCH
        logit = jax.jit(jax.vmap(lambda z, c: model(v, z)[c]))
        curves = {}
        for name, m in maps.items():
            score = m.reshape(n, grid, PATCH, grid, PATCH).sum(axis=(2, 4)).reshape(n, -1)
            order = np.argsort(-score, axis=1)
            cur = np.asarray(x).copy()
            vals = [np.asarray(logit(jnp.asarray(cur), t))]
            for k in range(grid * grid):
                for i in range(n):
                    r, c = divmod(int(order[i, k]), grid)
                    cur[i, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = \
                        mean[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
                vals.append(np.asarray(logit(jnp.asarray(cur), t)))
            curves[name] = np.mean(np.stack(vals), axis=1).tolist()
        vg = jnp.asarray(maps["VG"])
        leak = {}
        for kind in ("relu", "linear"):
            for cls in (PatternAttribution, PatternNet):
                a = explain(cls(pats, kind=kind), model, v, x, t).astype(jnp.float64)
                leak[f"{cls.__name__} ({kind})"] = _dist(a, vg)
        leak["gradient x input"] = _dist(maps["gradient x input"], vg)
        return curves, leak

    @staticmethod
    def _figure(curves, model, png):
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

    def markdown(self, rows, cfg):
        out = ["rho (mean over each layer's units; 1 = no signal left in the distractor):", "",
               "| model | layer | inputs d | units | S_w | S_a | S_a+- | fit s |", "|---|---|---|---|---|---|---|---|"]
        for s in rows:
            for layer, r in s["rho"].items():
                out.append(f"| {s['model']} | {layer} | {r['d']} | {r['units']} | {r['S_w']:.3f} | {r['S_a']:.3f} | "
                           f"{r['S_a+-']:.3f} | {s['fit_s']:.1f} |")
        out += ["", "Distance to VG (the paper's metric, sqrt 2 = unrelated):", "",
                "| model | explanation | mean | max |", "|---|---|---|---|"]
        for s in rows:
            for name, r in s["leak"].items():
                out.append(f"| {s['model']} | {name} | {r['mean']:.3f} | {r['max']:.3f} |")
        out += ["", "Image degradation: the explained logit after removing k patches (mean over images):", "",
                "| model | method | k = 0 | 5 | 10 | 20 | 49 |", "|---|---|---|---|---|---|---|"]
        for s in rows:
            for name, c in s["degradation"].items():
                out.append(f"| {s['model']} | {name} | " + " | ".join(f"{c[k]:.2f}" for k in (0, 5, 10, 20, 49))
                           + " |")
        return "\n".join(out)


@dataclasses.dataclass(frozen=True)
class LeakageConfig:
    models: tuple[str, ...] = option(("twolayer", "lenet"), "models (checkpoints: PATTERN_CHECKPOINTS)")
    fit: int = option(6000, "training images the operator fits the patterns on")
    n: int = option(256, "test images explained")
    public: str = option("256:2000", "test-image range LO:HI the attacker estimates covariances on")
    rconds: tuple[float, ...] = option((1e-10, 1e-4, 1e-2), "relative cut-offs of the covariances' pseudo-inverses")


def _cosines(a, b, mask=None):
    """Per-column cosine of ``a`` and ``b`` ``[d, u]`` (rows restricted to ``mask``)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return np.sum(a * b, axis=0) / np.where(den > 0, den, np.nan)


class PatternLeakageStudy(Study):
    name = "pattern-leakage"
    title = "PatternNet/PatternAttribution: weights and VG an attacker gets from patterns and answers"
    Config = LeakageConfig
    doc, block = "docs/PATTERN.md", "pattern_leakage"
    out = "results/patterns"

    def checkpoints(self, cfg):
        return _checkpoints(cfg.models)

    def quick(self, cfg):
        return dataclasses.replace(cfg, models=("twolayer",), fit=1000, n=16, public="16:400", rconds=(1e-4,))

    def units(self, cfg):
        lo, hi = self._public(cfg)
        if lo < cfg.n:
            raise ValueError(f"public={cfg.public} overlaps the {cfg.n} explained test images; start it at >= {cfg.n}")
        return [Unit({"model": m, "fit": cfg.fit, "n": cfg.n, "public": [lo, hi], "rconds": list(cfg.rconds)}, (m,),
                     label=m) for m in cfg.models]

    @staticmethod
    def _public(cfg):
        try:
            lo, hi = (int(s) for s in cfg.public.split(":"))
        except ValueError:
            raise ValueError(f"public={cfg.public!r}: give a test-image range LO:HI, e.g. 256:2000") from None
        return lo, hi

    def run(self, unit, ctx):
        s = unit.settings
        ds = ctx.dataset("mnist")
        model, v, _ = ctx.checkpoint(s["model"])
        n, (lo, hi) = s["n"], s["public"]
        fit = jnp.asarray(normalize(ds.train_images[:s["fit"]], dtype=np.float32))
        public = jnp.asarray(normalize(ds.test_images[lo:hi], dtype=np.float32))
        pats = P.fit_patterns(model, v, fit, progress=ctx.progress)
        first = P.kernel_layers(model, v)[0]
        a = P.flatten_kernel(np.asarray(pats[first]["linear"], np.float64))
        xo, w, _ = P.layer_samples(model, v, fit, first)
        xa, _, _ = P.layer_samples(model, v, public, first)
        varying = np.var(xa, axis=0) > 0
        out = {"model": s["model"], "layer": first, "d": int(w.shape[0]), "units": int(w.shape[1]),
               "varying": int(varying.sum()), "kernel": []}
        for who, x in (("operator", xo), ("attacker", xa)):
            cov = np.cov(x, rowvar=False, bias=True)
            for rcond in s["rconds"]:
                got = P.kernel_from_pattern(a, cov, rcond=rcond)
                row = {"C": who, "rcond": rcond}
                for where, mask in (("all", None), ("varying", varying)):
                    c = _cosines(got, w, mask)
                    row[where] = {"median": float(np.nanmedian(c)), "min": float(np.nanmin(c))}
                out["kernel"].append(row)
        x = jnp.asarray(normalize(ds.test_images[:n], dtype=np.float32))
        t = jnp.asarray(ds.test_labels[:n])
        vg = np.asarray(explain(VG(), model, v, x, t), np.float64).reshape(n, -1)
        pix = np.asarray(public, np.float64).reshape(len(public), -1)
        covs = {"attacker": np.cov(pix, rowvar=False, bias=True),
                "operator": np.cov(np.asarray(fit, np.float64).reshape(len(fit), -1), rowvar=False, bias=True)}
        support = np.var(pix, axis=0) > 0
        inverses = {(who, rcond): np.linalg.pinv(cov, rcond=rcond, hermitian=True)  # once, for both pattern kinds
                    for who, cov in covs.items() for rcond in s["rconds"]}
        vg_support = np.where(support, vg, 0.0)
        answers = {}
        for kind in ("linear", "relu"):
            pn = np.asarray(explain(PatternNet(pats, kind=kind), model, v, x, t), np.float64).reshape(n, -1)
            pa = np.asarray(explain(PatternAttribution(pats, kind=kind), model, v, x, t), np.float64).reshape(n, -1)
            answers[f"PatternNet ({kind})"] = pn
            answers[f"PatternAttribution ({kind})"] = pa
            for (who, rcond), inverse in inverses.items():
                answers[f"C^+ PatternNet ({kind}), {who}'s C, rcond {rcond:g}"] = pn @ inverse
        out["vg"] = {k: {"vs VG": _dist(e, vg), "vs VG on varying pixels": _dist(e, vg_support)}
                     for k, e in answers.items()}
        out["vg_support_pixels"] = int(support.sum())
        return [out]

    def markdown(self, rows, cfg):
        lines = ["Weights from the published linear patterns of the first layer (cosine with the true kernel per "
                 "unit, median (min)):", "",
                 "| model | layer | inputs (varying in public data) | C from | rcond | all inputs | varying inputs |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            for k in r["kernel"]:
                lines.append(f"| {r['model']} | {r['layer']} | {r['d']} ({r['varying']}) | {k['C']} | {k['rcond']:g} | "
                             + " | ".join(f"{k[w]['median']:.4f} ({k[w]['min']:.4f})" for w in ("all", "varying"))
                             + " |")
        lines += ["", "Distance to VG of the answers and of whitened PatternNet answers (paper's metric, mean (max); "
                  "sqrt 2 = unrelated):", "", "| model | answer | vs VG | vs VG on the varying pixels |",
                  "|---|---|---|---|"]
        for r in rows:
            for k, d in r["vg"].items():
                a, b = d["vs VG"], d["vs VG on varying pixels"]
                lines.append(f"| {r['model']} | {k} | {a['mean']:.3f} ({a['max']:.3f}) | "
                             f"{b['mean']:.3f} ({b['max']:.3f}) |")
        return "\n".join(lines)
