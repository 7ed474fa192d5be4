"""``evaluate(config)``: the paper's Tables 1-4 and Figures 4-5 for trained models.

For each model and dtype it loads (or trains) a checkpoint, runs the protocol
of :mod:`jaxrecover.experiments` on the first N test images, and writes

* ``OUT/<model>_<dtype>_<mode>_n<N>_m<m>.json`` - one file per run;
* ``OUT/<model>_<dtype>_<mode>_n<N>_m<m>.fig4.npz`` - the Figure 4 arrays of that run;
* ``OUT/fig4_<dtype>.png`` and ``OUT/fig5_<dtype>.png`` - the figures, of every run in ``OUT`` (see
  :func:`_draw_figures` for a folder whose runs lack their Figure 4 arrays);
* ``OUT/report.md`` - the tables, ours beside the paper's, built from the JSON.

Runs resume: distances are saved after every chunk to a ``.partial.npz``
beside the JSON. A run whose JSON exists is reused only when it was computed
from the same weights (SHA-256 of the variables), data and settings; otherwise
it is recomputed and replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import validate
from .._version import __version__
from ..checkpoint import CheckpointError, checkpoint_exists, load_metadata, tree_sha256, writer
from ..data import load_dataset, normalize
from ..engine import agreed
from ..fileio import atomic_save_npz, atomic_write_text
from ..models import MODEL_NAMES, cast_variables, check_float_dtype, get_model, make_model
from ..training import TrainConfig, estimate_train_seconds, load_trained, train_and_evaluate
from .ablation import batchstats_protocol_chunk, make_batchstats_logit_fn
from ..provenance import machine_info
from .experiments import (PAPER, RULE, ProtocolConfig, experiments_for, explain_examples,
                          path_gradient_norms, run_protocol, summarize_results)
from .report import distances_sha256, load_results, markdown_report, record_sha256, run_files, verify_record

__all__ = ["EvalConfig", "evaluate"]


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
    """``load_trained`` of the model's checkpoint, trained (or finished) first when missing.

    Training holds the folder's writer lock: a second evaluation that needs the same checkpoint waits for it
    (and then loads what the first one trained) instead of training over it."""
    ckpt = _checkpoint_dir(cfg, model)
    if cfg.train_missing and jax.process_count() == 1 and not _finished(ckpt):
        def say(holder):
            print(f"waiting for another run ({holder}) that is training {ckpt} ...", file=sys.stderr, flush=True)

        with writer(ckpt, wait=True, on_wait=say):
            return _load_or_train_locked(cfg, model, ckpt, dataset, progress)
    return _load_or_train_locked(cfg, model, ckpt, dataset, progress)


def _announce_training(cfg: EvalConfig, ds) -> None:
    """Before anything runs: which checkpoints are missing and will be trained first, and how long that takes
    on this machine (:func:`jaxrecover.training.estimate_train_seconds`), on stderr."""
    missing = [m for m in cfg.models if not _finished(_checkpoint_dir(cfg, m))]
    if not missing or not cfg.train_missing or jax.process_count() > 1:
        return
    n_train = len(ds.train_images) if not cfg.max_train else min(cfg.max_train, len(ds.train_images))
    print(f"{len(missing)} of {len(cfg.models)} checkpoints missing in {cfg.checkpoints}/: timing a few training "
          "steps of each (--no-train refuses instead, --models picks fewer) ...", file=sys.stderr, flush=True)
    total = 0.0
    for m in missing:
        tc = TrainConfig(model=m, dataset=cfg.dataset, epochs=cfg.epochs, seed=cfg.seed, max_train=cfg.max_train)
        seconds = estimate_train_seconds(tc, n_train)
        total += seconds
        print(f"  will train {m}: {tc.resolved_epochs()} epochs on {n_train} images, about {seconds / 60:.1f} min here",
              file=sys.stderr, flush=True)
    print(f"  training first: about {total / 60:.1f} min in all, then the protocol", file=sys.stderr, flush=True)


def _finished(ckpt: Path) -> bool:
    if not checkpoint_exists(ckpt):
        return False
    meta = load_metadata(ckpt)
    return int(meta.get("epochs", 0)) >= int(meta.get("planned_epochs", 0))


def _load_or_train_locked(cfg: EvalConfig, model: str, ckpt: Path, dataset, progress: bool):
    meta = load_metadata(ckpt) if checkpoint_exists(ckpt) else {}
    # checkpoints written before planned_epochs was recorded count as finished
    done, planned = int(meta.get("epochs", 0)), int(meta.get("planned_epochs", 0))
    if meta and done < planned:
        # an interrupted training run: finish it (its own settings; a mismatch is train_and_evaluate's error)
        if jax.process_count() > 1 or not cfg.train_missing:
            raise CheckpointError(f"the checkpoint in {ckpt} is unfinished ({done} of {planned} epochs); finish "
                                  f"it (python train.py --model {model} --epochs {planned} --out {ckpt}) first")
        train_and_evaluate(TrainConfig(model=model, dataset=cfg.dataset, epochs=planned, seed=meta.get("seed", cfg.seed),
                                       max_train=meta.get("max_train")), ckpt, dataset=dataset, progress=progress)
    if not checkpoint_exists(ckpt):
        if jax.process_count() > 1:
            raise CheckpointError(f"no checkpoint for {model} in {ckpt}; a multi-process evaluation does not train: "
                                  f"train it first in one process (python train.py --model {model} --out {ckpt})")
        if not cfg.train_missing:
            raise CheckpointError(f"no checkpoint for {model} in {ckpt}; train it (python train.py --model {model} "
                                  f"--out {ckpt}) or drop --no-train")
        tc = TrainConfig(model=model, dataset=cfg.dataset, epochs=cfg.epochs, seed=cfg.seed, max_train=cfg.max_train)
        print(f"no checkpoint for {model} in {ckpt}: training it first ({tc.resolved_epochs()} epochs; "
              "--no-train refuses instead)", file=sys.stderr, flush=True)
        train_and_evaluate(tc, ckpt, dataset=dataset, progress=progress)
    return load_trained(ckpt, model=model)


def _run_name(cfg: EvalConfig, model: str, dtype: str, n: int) -> str:
    return f"{model}_{dtype}_{cfg.mode}_n{n}_m{cfg.steps}" + ("_bnbatch" if cfg.bn_batch_stats else "")


def _settings(cfg: EvalConfig, model: str, dtype: str, ds, n: int, variables, x, y) -> dict[str, Any]:
    """Everything that changes a run's numbers: a stored result is reused only when all of it is equal."""
    data = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.asarray(y, np.int64).tobytes()).hexdigest()
    return {"model": model, "dataset": ds.name, "split": ds.split, "n": n, "dtype": dtype, "mode": cfg.mode,
            "steps": cfg.steps, "a": cfg.a, "rule": RULE, "output": "logit", "bn_batch_stats": cfg.bn_batch_stats,
            "weights_sha256": tree_sha256(variables), "inputs_sha256": data}


def _stored(path: Path, settings: dict) -> dict | None:
    """The stored result at ``path`` if it was computed with exactly ``settings`` and is intact (else None:
    recompute; an edited or damaged file is recomputed with a warning, never reused)."""
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("settings") != settings:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            verify_record(path, rec)
    except ValueError as e:
        warnings.warn(f"{e.args[0].split('; delete')[0]}: recomputing it", RuntimeWarning, stacklevel=3)
        return None
    if "record_sha256" not in rec and not path.with_suffix(".distances.npz").exists():
        return None  # nothing to check it against: recompute rather than trust it
    return rec


def evaluate(cfg: EvalConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (model, dtype) of ``cfg``; returns the result records (also written as JSON)."""
    for m in cfg.models:
        get_model(m)
        ProtocolConfig(experiments=experiments_for(m), mode=cfg.mode, steps=cfg.steps, a=cfg.a)  # validates
    for d in cfg.dtypes:
        check_float_dtype(d)
    validate.seed("seed", cfg.seed)
    if cfg.n is not None and (isinstance(cfg.n, bool) or not isinstance(cfg.n, int) or cfg.n < 1):
        raise ValueError(f"n must be a positive number of test images (or None for all), got {cfg.n!r}")
    if cfg.bn_batch_stats:
        no_bn = [m for m in cfg.models if m != "resnet18"]
        if no_bn:
            raise ValueError(f"--bn-batch-stats is an ablation for models with BatchNorm (resnet18), not {no_bn}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset)
    if len(ds.test_images) == 0:
        raise ValueError(f"dataset {ds.name} has no test images")
    n = len(ds.test_images) if cfg.n is None else min(cfg.n, len(ds.test_images))
    _announce_training(cfg, ds)
    records = []
    for model_name in cfg.models:
        name, variables32, meta = _load_or_train(cfg, model_name, ds, progress)
        model = make_model(model_name)
        pcfg = ProtocolConfig(experiments=experiments_for(model_name), steps=cfg.steps, a=cfg.a, mode=cfg.mode)
        chunk_fn, mode = None, cfg.mode
        if cfg.bn_batch_stats:
            bs_fn = make_batchstats_logit_fn(get_model(model_name))
            chunk_fn = functools.partial(_batchstats_distances, bs_fn, steps=cfg.steps, a=cfg.a)
            mode = "bn-batch-stats"
        for dtype in cfg.dtypes:
            path = out / (_run_name(cfg, model_name, dtype, n) + ".json")
            variables = cast_variables(variables32, dtype)
            x_all = normalize(ds.test_images[:n], np.dtype(dtype))
            y_all = ds.test_labels[:n]
            settings = _settings(cfg, model_name, dtype, ds, n, variables, x_all, y_all)
            rec = _stored(path, settings)
            if not agreed(rec is not None):
                t0 = time.time()
                dists, seconds = run_protocol(model, variables, x_all, y_all, pcfg, chunk_size=cfg.chunk_size,
                                              partial_path=path.with_suffix(".partial.npz"), progress=progress,
                                              desc=f"{model_name} {dtype}", chunk_fn=chunk_fn, tag=mode)
                k5 = min(cfg.fig5_n, n)
                if cfg.bn_batch_stats:  # gradient norms of the batch-coupled points, as the ablation sees them
                    norms = np.asarray(batchstats_protocol_chunk(
                        make_batchstats_logit_fn(get_model(model_name)), variables, jnp.asarray(x_all[:k5]),
                        jnp.asarray(y_all[:k5], jnp.int32), cfg.steps, cfg.a)[1], np.float64)
                else:
                    norms = np.asarray(path_gradient_norms(model, variables, x_all[:k5], y_all[:k5], cfg.steps),
                                       np.float64)
                rec = {
                    "model": model_name, "dataset": ds.name, "split": ds.split, "n": n, "dtype": dtype,
                    "mode": mode, "steps": cfg.steps, "a": cfg.a, "seed": cfg.seed, "rule": RULE,
                    "output": "logit of the true label", "baseline": "zeros",
                    "metric_dtype": "float64" if jax.config.jax_enable_x64 else dtype,
                    "version": __version__, "checkpoint": str(_checkpoint_dir(cfg, model_name)),
                    "test_accuracy": meta["test_accuracy"], "train_epochs": meta["epochs"],
                    "gradient_evaluations_per_image": pcfg.evaluations_per_image,
                    "batchnorm": ("batch statistics (ablation: m path points of one image form one batch, "
                                  f"VG over chunks of {cfg.chunk_size} test images)") if cfg.bn_batch_stats
                                 else "inference (running statistics)",
                    "wall_seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "elapsed_seconds_this_session": round(time.time() - t0, 2),
                    "machine": machine_info(), "command": cfg.command,
                    "results": summarize_results(dists),
                    "paper": {e: PAPER[e].get(model_name) for e in pcfg.experiments},
                    "fig5": _fig5_summary(norms),
                    "distances_sha256": distances_sha256(dists),
                    "settings": settings,
                }
                rec["record_sha256"] = record_sha256(rec)
                if jax.process_index() == 0:  # multi-process runs: every process holds all distances, one writes
                    atomic_save_npz(path.with_suffix(".distances.npz"), compressed=True, **dists)
                    atomic_write_text(path, json.dumps(rec, indent=2, sort_keys=True))
                    path.with_suffix(".partial.npz").unlink(missing_ok=True)
                if jax.process_count() > 1:  # each process's resume file (run_protocol's multi-process shares)
                    Path(f"{path.with_suffix('.partial.npz')}.p{jax.process_index()}of{jax.process_count()}").unlink(
                        missing_ok=True)
            records.append(rec)
            if cfg.figures and not cfg.bn_batch_stats:
                k4 = min(cfg.fig4_examples, n)
                examples = jax.device_get(explain_examples(model, variables, x_all[:k4], y_all[:k4], pcfg))
                if jax.process_index() == 0:  # beside the run's JSON: figures show every run in --out
                    atomic_save_npz(path.with_suffix(".fig4.npz"), compressed=True, x=x_all[:k4],
                                    **{k: np.asarray(v) for k, v in examples.items()})
    if jax.process_index() != 0:
        return records
    if cfg.figures and not cfg.bn_batch_stats:
        _draw_figures(out, cfg.steps, cfg.a)
    atomic_write_text(out / "report.md", markdown_report(load_results(out)))
    return records


def _draw_figures(out: Path, steps: int, a: float) -> None:
    """Figures 4 and 5 of EVERY run in ``out`` with this m and a (several evaluate calls may share ``out``).

    Per model and dtype the run with the most images is shown. Figure 5 is drawn
    from the runs' JSON (which carries its summary). Figure 4 needs each run's
    ``<run>.fig4.npz``; where some run of a dtype lacks it (a checkout that has
    the JSON but not the arrays), the models that have it are drawn to
    ``fig4_<dtype>_<models>.png`` and ``fig4_<dtype>.png`` is left as it was, so
    a partial rerun never replaces a figure of every model by one of a few.
    """
    from .figures import figure4, figure5

    runs = {}
    for json_path in run_files(out):
        try:
            rec = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a result: not shown
        if not isinstance(rec, dict) or "fig5" not in rec or rec.get("steps") != steps or rec.get("a") != a \
                or rec.get("mode") == "bn-batch-stats":
            continue
        key = (rec["model"], rec["dtype"])
        if key not in runs or rec["n"] > runs[key][0]["n"]:
            runs[key] = (rec, json_path.with_suffix(".fig4.npz"))
    order = {m: i for i, m in enumerate(MODEL_NAMES)}
    for dtype in sorted({d for _, d in runs}):
        keys = sorted((k for k in runs if k[1] == dtype), key=lambda k: order.get(k[0], 99))
        per_model = {}
        for k in keys:
            if runs[k][1].exists():
                with np.load(runs[k][1]) as z:
                    per_model[k[0]] = (z["x"], {name: z[name] for name in z.files if name != "x"})
        missing = [k for k in keys if k[0] not in per_model]
        if not missing:
            figure4(per_model, out / f"fig4_{dtype}.png", dtype, steps, a)
        elif per_model:
            name = f"fig4_{dtype}_{'_'.join(per_model)}.png"
            figure4(per_model, out / name, dtype, steps, a)
            warnings.warn(f"Figure 4 ({dtype}): {', '.join(runs[k][1].name for k in missing)} not in {out}; drew "
                          f"{name} and left fig4_{dtype}.png as it was (rerun evaluate.py for "
                          f"{', '.join(k[0] for k in missing)} to redraw it)", stacklevel=2)
        figure5({k[0]: runs[k][0]["fig5"] for k in keys}, out / f"fig5_{dtype}.png", dtype)


def _batchstats_distances(bs_fn, params, xs, ts, *, steps, a):
    return batchstats_protocol_chunk(bs_fn, params, xs, ts, steps, a)[0]


def _fig5_summary(norms: np.ndarray) -> dict:
    """Median and quartiles of ||grad f(i/m x)|| over images, and the end-to-peak ratio."""
    q25, med, q75 = np.quantile(norms, [0.25, 0.5, 0.75], axis=0)
    ratio = norms[:, -1] / norms.max(axis=1)
    return {"i": list(range(1, norms.shape[1] + 1)), "median": med.tolist(), "q25": q25.tolist(),
            "q75": q75.tolist(), "n_images": int(norms.shape[0]),
            "end_over_max_median": float(np.median(ratio)), "end_over_max_min": float(ratio.min())}
