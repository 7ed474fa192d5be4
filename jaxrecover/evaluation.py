"""``evaluate(config)``: the paper's Tables 1-4 and Figures 4-5 for trained models.

For each model and dtype it loads (or trains) a checkpoint, runs the protocol
of :mod:`jaxrecover.experiments` on the first N test images, and writes

* ``OUT/<model>_<dtype>_<mode>_n<N>_m<m>.json`` - one file per run;
* ``OUT/fig4_<dtype>.png`` and ``OUT/fig5_<dtype>.png`` - the figures;
* ``OUT/report.md`` - the tables, ours beside the paper's, built from the JSON.

Runs resume: distances are saved after every chunk to a ``.partial.npz``
beside the JSON, and a run whose JSON exists is not repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__
from .checkpoint import checkpoint_exists
from .fileio import atomic_save_npz, atomic_write_text
from .data import load_dataset, normalize
from .experiments import (EXPERIMENTS, PAPER, ProtocolConfig, batchstats_protocol_chunk,
                          experiments_for, explain_examples, machine_info, make_batchstats_logit_fn,
                          path_gradient_norms, run_protocol, summarize_results)
from .models import MODEL_NAMES, cast_variables, check_float_dtype, get_model, make_logit_fn
from .training import TrainConfig, load_trained, train_and_evaluate

__all__ = ["EvalConfig", "evaluate", "load_results", "markdown_report"]


@dataclasses.dataclass
class EvalConfig:
    """What ``evaluate`` runs. ``n=None`` is the whole test split."""

    models: tuple[str, ...] = MODEL_NAMES
    dataset: str = "mnist"
    dtypes: tuple[str, ...] = ("float32", "float64")
    n: int | None = None
    steps: int = 50
    a: float = 0.98
    mode: str = "faithful"
    seed: int = 0
    checkpoints: str = "checkpoints"
    out: str = "results"
    train_missing: bool = True
    epochs: int | None = None  # for models trained because their checkpoint is missing
    max_train: int | None = None
    chunk_size: int = 16
    figures: bool = True
    fig4_examples: int = 2
    fig5_n: int = 100
    bn_batch_stats: bool = False  # ablation: BatchNorm on batch statistics (models with BatchNorm only)
    command: str = ""


def _checkpoint_dir(cfg: EvalConfig, model: str) -> Path:
    suffix = "" if cfg.dataset == "mnist" else "_" + cfg.dataset.replace(":", "_").replace("/", "_")
    return Path(cfg.checkpoints) / f"{model}{suffix}"


def _load_or_train(cfg: EvalConfig, model: str, dataset, progress: bool):
    ckpt = _checkpoint_dir(cfg, model)
    if not checkpoint_exists(ckpt):
        if jax.process_count() > 1:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"no checkpoint for {model} in {ckpt}; a multi-process evaluation does not train: "
                                  f"train it first in one process (python train.py --model {model} --out {ckpt})")
        if not cfg.train_missing:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"no checkpoint for {model} in {ckpt}; train it (python train.py --model {model} "
                                  f"--out {ckpt}) or drop --no-train")
        train_and_evaluate(TrainConfig(model=model, dataset=cfg.dataset, epochs=cfg.epochs, seed=cfg.seed,
                                       max_train=cfg.max_train), ckpt, dataset=dataset, progress=progress)
    return load_trained(ckpt)


def _agreed(flag: bool) -> bool:
    """``flag`` as process 0 sees it (multi-process runs must all take the same branch; no-op otherwise)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _run_name(cfg: EvalConfig, model: str, dtype: str, n: int) -> str:
    return f"{model}_{dtype}_{cfg.mode}_n{n}_m{cfg.steps}" + ("_bnbatch" if cfg.bn_batch_stats else "")


def evaluate(cfg: EvalConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (model, dtype) of ``cfg``; returns the result records (also written as JSON)."""
    for m in cfg.models:
        get_model(m)
    for d in cfg.dtypes:
        check_float_dtype(d)
    ProtocolConfig(mode=cfg.mode, steps=cfg.steps)  # validates
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset)
    n = len(ds.test_images) if cfg.n is None else min(cfg.n, len(ds.test_images))
    records, fig4, fig5 = [], {}, {}
    if cfg.bn_batch_stats:
        no_bn = [m for m in cfg.models if m != "resnet18"]
        if no_bn:
            raise ValueError(f"--bn-batch-stats is an ablation for models with BatchNorm (resnet18), not {no_bn}")
    for model in cfg.models:
        name, variables32, meta = _load_or_train(cfg, model, ds, progress)
        logit_fn = make_logit_fn(model)
        chunk_fn, mode = None, cfg.mode
        if cfg.bn_batch_stats:
            bs_fn = make_batchstats_logit_fn(get_model(model))
            chunk_fn = functools.partial(_batchstats_distances, bs_fn, steps=cfg.steps, a=cfg.a)
            mode = "bn-batch-stats"
        for dtype in cfg.dtypes:
            path = out / (_run_name(cfg, model, dtype, n) + ".json")
            variables = cast_variables(variables32, dtype)
            x_all = normalize(ds.test_images[:n], np.dtype(dtype))
            y_all = ds.test_labels[:n]
            if _agreed(path.exists()):
                rec = json.loads(path.read_text())
            else:
                pcfg = ProtocolConfig(experiments=experiments_for(model), steps=cfg.steps, a=cfg.a, mode=cfg.mode)
                t0 = time.time()
                dists, seconds = run_protocol(logit_fn, variables, x_all, y_all, pcfg, chunk_size=cfg.chunk_size,
                                              partial_path=path.with_suffix(".partial.npz"), progress=progress,
                                              desc=f"{model} {dtype}", chunk_fn=chunk_fn, tag=mode)
                k5 = min(cfg.fig5_n, n)
                if cfg.bn_batch_stats:  # gradient norms of the batch-coupled points, as the ablation sees them
                    norms = np.asarray(batchstats_protocol_chunk(
                        make_batchstats_logit_fn(get_model(model)), variables, jnp.asarray(x_all[:k5]),
                        jnp.asarray(y_all[:k5], jnp.int32), cfg.steps, cfg.a)[1], np.float64)
                else:
                    norms = np.asarray(path_gradient_norms(logit_fn, variables, jnp.asarray(x_all[:k5]),
                                                           jnp.asarray(y_all[:k5]), cfg.steps), np.float64)
                rec = {
                    "model": model, "dataset": ds.name, "split": ds.split, "n": n, "dtype": dtype,
                    "mode": mode, "steps": cfg.steps, "a": cfg.a, "seed": cfg.seed, "rule": "riemann_right",
                    "output": "logit of the true label", "baseline": "zeros",
                    "metric_dtype": "float64" if jax.config.jax_enable_x64 else dtype,
                    "version": __version__, "checkpoint": str(_checkpoint_dir(cfg, model)),
                    "test_accuracy": meta["test_accuracy"], "train_epochs": meta["epochs"],
                    "gradient_evaluations_per_image": pcfg.evaluations_per_image,
                    "batchnorm": ("batch statistics (ablation: m path points of one image form one batch, "
                                  f"VG over chunks of {cfg.chunk_size} test images)") if cfg.bn_batch_stats
                                 else "inference (running statistics)",
                    "wall_seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "elapsed_seconds_this_session": round(time.time() - t0, 2),
                    "machine": machine_info(), "command": cfg.command,
                    "results": summarize_results(dists),
                    "paper": {e: PAPER[e].get(model) for e in pcfg.experiments},
                    "fig5": _fig5_summary(norms),
                    "distances_sha256": _digest(dists),
                }
                if jax.process_index() == 0:  # multi-process runs: every process holds all distances, one writes
                    atomic_write_text(path, json.dumps(rec, indent=2, sort_keys=True))
                    atomic_save_npz(path.with_suffix(".distances.npz"), compressed=True, **dists)
                    path.with_suffix(".partial.npz").unlink(missing_ok=True)
                if jax.process_count() > 1:  # each process's resume file (run_protocol's multi-process shares)
                    Path(f"{path.with_suffix('.partial.npz')}.p{jax.process_index()}of{jax.process_count()}").unlink(
                        missing_ok=True)
            records.append(rec)
            fig5[(model, dtype)] = rec["fig5"]
            if cfg.figures and not cfg.bn_batch_stats:
                k4 = min(cfg.fig4_examples, n)
                fig4[(model, dtype)] = (x_all[:k4], jax.device_get(explain_examples(
                    logit_fn, variables, jnp.asarray(x_all[:k4]), jnp.asarray(y_all[:k4], jnp.int32), cfg.steps, cfg.a)))
    if jax.process_index() != 0:
        return records
    if cfg.figures:
        from .figures import figure4, figure5

        for dtype in cfg.dtypes:
            figure4({k[0]: v for k, v in fig4.items() if k[1] == dtype}, out / f"fig4_{dtype}.png", dtype)
            figure5({k[0]: v for k, v in fig5.items() if k[1] == dtype}, out / f"fig5_{dtype}.png", dtype)
    atomic_write_text(out / "report.md", markdown_report(load_results(out)))
    return records


def _batchstats_distances(bs_fn, params, xs, ts, *, steps, a):
    return batchstats_protocol_chunk(bs_fn, params, xs, ts, steps, a)[0]


def _digest(dists):
    import hashlib

    h = hashlib.sha256()
    for k in sorted(dists):
        h.update(np.asarray(dists[k], np.float64).tobytes())
    return h.hexdigest()


def _fig5_summary(norms: np.ndarray) -> dict:
    """Median and quartiles of ||grad f(i/m x)|| over images, and the end-to-peak ratio."""
    q25, med, q75 = np.quantile(norms, [0.25, 0.5, 0.75], axis=0)
    ratio = norms[:, -1] / norms.max(axis=1)
    return {"i": list(range(1, norms.shape[1] + 1)), "median": med.tolist(), "q25": q25.tolist(),
            "q75": q75.tolist(), "n_images": int(norms.shape[0]),
            "end_over_max_median": float(np.median(ratio)), "end_over_max_min": float(ratio.min())}


def load_results(directory: str | Path) -> list[dict]:
    """Every run JSON in ``directory`` (sorted by model order, dtype)."""
    recs = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    order = {m: i for i, m in enumerate(MODEL_NAMES)}
    return sorted(recs, key=lambda r: (order.get(r["model"], 99), r["dtype"], r["mode"], r["n"]))


def _fmt(v):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.3e}" if abs(v) < 1e-2 else f"{v:.3f}"


def markdown_report(records: list[dict]) -> str:
    """Tables 1-4 with the paper's mean and variance beside ours, from result records."""
    titles = {"table1": "Table 1: distance(VG, IG_50) (reference)", "A": "Table 2: Experiment A, eq. (2), no-bias models",
              "B": "Table 3: Experiment B, eq. (4), m = 50 and 49", "C": "Table 4: Experiment C, eq. (3), a = 0.98"}
    lines = []
    for e in EXPERIMENTS:
        rows = [r for r in records if e in r["results"]]
        if not rows:
            continue
        lines += [f"### {titles[e]}", "",
                  "| model | dataset (N) | dtype | mode | mean | variance | median | max | paper mean | paper var | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r["results"][e]
            p = PAPER[e].get(r["model"]) or (None, None)
            lines.append(f"| {r['model']} | {r['dataset']} ({r['n']}) | {r['dtype']} | {r['mode']} | {_fmt(s['mean'])} "
                         f"| {_fmt(s['var'])} | {_fmt(s['median'])} | {_fmt(s['max'])} | {_fmt(p[0])} | {_fmt(p[1])} "
                         f"| {r['wall_seconds']:.0f} |")
        lines.append("")
    fig = [r for r in records if "fig5" in r]
    if fig:
        lines += ["### Figure 5 summary: ||grad f(x)|| / max_i ||grad f(i/m x)|| (over the first images)", "",
                  "| model | dtype | images | median ratio | smallest ratio |", "|---|---|---|---|---|"]
        for r in fig:
            f5 = r["fig5"]
            lines.append(f"| {r['model']} | {r['dtype']} | {f5['n_images']} | {f5['end_over_max_median']:.3e} "
                         f"| {f5['end_over_max_min']:.3e} |")
        lines.append("")
    if records:
        r0 = records[0]
        mach = r0["machine"]
        lines += [f"Machine: {mach['processor']}, {mach['cpu_count']} cores, JAX {mach['jax_version']} "
                  f"({mach['jax_backend']}); jaxrecover {r0['version']}.",
                  f"Command: `{r0['command']}`" if r0.get("command") else "", ""]
    return "\n".join(lines)
