"""Training the paper's models: optax, cross-entropy on logits, Orbax checkpoints.

``train_and_evaluate(config, workdir)`` is the whole job; ``train.py`` is a thin
CLI over it. Training resumes from ``workdir`` when a checkpoint is there.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import ops, validate
from ._version import __version__
from .checkpoint import CheckpointError, checkpoint_exists, load_checkpoint, load_metadata, save_checkpoint, writer
from .data import Dataset, load_dataset, normalize
from .models import INPUT_SHAPE, get_model, init_variables, make_batched_logit_fn

__all__ = ["TrainConfig", "DEFAULT_EPOCHS", "train_and_evaluate", "estimate_train_seconds", "load_trained", "accuracy", "make_train_step",
           "checkpoint_folder", "ensure_trained"]

#: Epochs that reach the README's accuracies on the offline split.
DEFAULT_EPOCHS = {"twolayer": 30, "twolayer_nobias": 30, "lenet": 15, "lenet_nobias": 15, "resnet18": 10,
                  "mlp2": 20, "mlp2_nobias": 20, "mlp3": 20, "mlp3_nobias": 20}


@dataclasses.dataclass
class TrainConfig:
    """What to train and how. ``epochs=None`` takes :data:`DEFAULT_EPOCHS`."""

    model: str = "lenet"
    dataset: str = "mnist"
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    augment: bool = True  # random shifts of up to 2 pixels
    seed: int = 0
    max_train: int | None = None  # use only the first k training images (tests, demos)
    max_test: int | None = None
    #: L2 PGD adversarial training (Madry et al.): the radius in [0, 1] pixel units (0: standard training);
    #: every batch is replaced by its PGD points (random start, ``adv_steps`` steps of 2.5 eps / steps).
    adv_eps: float = 0.0
    adv_steps: int = 7

    def __post_init__(self):
        positive_int = validate.positive_int
        positive_int("epochs", self.epochs, allow_none=True)
        positive_int("batch_size", self.batch_size)
        positive_int("max_train", self.max_train, allow_none=True)
        positive_int("max_test", self.max_test, allow_none=True)
        positive_int("adv_steps", self.adv_steps)
        validate.seed("seed", self.seed)
        validate.radius("adv_eps (L2 radius of adversarial training)", self.adv_eps, allow_lo=True)
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be a positive finite number, got {self.learning_rate!r}")
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {self.weight_decay!r}")

    def resolved_epochs(self) -> int:
        return DEFAULT_EPOCHS.get(self.model, 10) if self.epochs is None else int(self.epochs)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = max(1, config.resolved_epochs() * steps_per_epoch)
    schedule = optax.cosine_decay_schedule(config.learning_rate, total, alpha=0.01)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def _shift(key, x, max_shift: int, fill):
    """Random translation of one NHWC-less image (28, 28, 1) by up to max_shift pixels."""
    p = max_shift
    padded = jnp.pad(x, ((p, p), (p, p), (0, 0)), constant_values=fill)
    dx, dy = jax.random.randint(key, (2,), 0, 2 * p + 1)
    return jax.lax.dynamic_slice(padded, (dx, dy, 0), x.shape)


def make_adversary(module, eps: float, steps: int, box=None):
    """``adversary(variables, x, y, key) -> x_adv``: L2 PGD (Foolbox ``L2PGD``, random start) of radius ``eps``
    in ``[0, 1]`` pixel units (times ``box.scale``; default box: MNIST as :func:`normalize` makes it), ``steps``
    steps of ``2.5 eps / steps`` (Madry et al.), in inference mode; no gradient flows through it."""
    from .search import InputBox, pgd_l2
    from .models import make_model
    box = InputBox.mnist() if box is None else box
    model = make_model(module)

    def adversary(variables, x, y, key):
        z, _ = pgd_l2(model, variables, x, y, eps * box.scale, 2.5 / steps, key, steps=steps, box=box)
        return jax.lax.stop_gradient(z)

    return adversary


def make_train_step(model, optimizer, augment: bool, fill: float, adversary=None):
    """A jitted ``step(variables, opt_state, x, y, key) -> (variables, opt_state, loss, acc)``; with
    ``adversary`` (:func:`make_adversary`) each (augmented) batch is replaced by its adversarial points."""
    def loss_fn(params, other, x, y):
        variables = {"params": params, **other}
        if other:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits, updates = model.apply(variables, x, train=True), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates)

    @ops.tuned_jit  # XLA:CPU's own float32 convolutions: LeNet's step ~1.7x faster than under jax.jit's defaults
    def step(variables, opt_state, x, y, key):
        if augment:
            x = jax.vmap(_shift, in_axes=(0, 0, None, None))(jax.random.split(key, x.shape[0]), x, 2, fill)
        if adversary is not None:
            x = adversary(variables, x, y, jax.random.fold_in(key, 1))
        params = variables["params"]
        other = {k: v for k, v in variables.items() if k != "params"}
        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, other, x, y)
        # optax mixes its int32 step count with Python floats (bias correction, schedule): its own arithmetic
        # needs standard promotion, even where callers (the tests) make everything else "strict"
        with jax.numpy_dtype_promotion("standard"):
            upd, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
        acc = jnp.mean(jnp.argmax(logits, -1).astype(y.dtype) == y)
        return {"params": params, **other, **updates}, opt_state, loss, acc

    return step


def accuracy(model, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Test accuracy (inference mode) of float images ``(N, 28, 28, 1)``."""
    logit_fn = ops.tuned_jit(make_batched_logit_fn(model))
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = logit_fn(variables, jnp.asarray(images[i : i + batch_size]))
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == np.asarray(labels[i : i + batch_size])))
    return correct / max(1, len(images))


def _initial_state(config: TrainConfig, steps_per_epoch: int):
    model = get_model(config.model)
    variables = init_variables(model, jax.random.key(config.seed), jnp.float32)
    optimizer = make_optimizer(config, steps_per_epoch)
    state = {
        "variables": variables,
        "opt_state": optimizer.init(variables["params"]),
        "epoch": np.int32(0),
    }
    return model, optimizer, state


def estimate_train_seconds(config: TrainConfig, n_train: int, *, steps: int = 3) -> float:
    """Seconds ``train_and_evaluate`` would take here for ``n_train`` images: ``steps`` training steps timed on
    this machine (the first one's compilation counted once, the median of the rest per step) times the planned
    steps. A few seconds (ResNet18: its compilation); an estimate, not a promise (data loading and evaluation
    are not timed)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (one compiles, the rest are timed), got {steps}")
    bs = max(1, min(config.batch_size, n_train))
    per_epoch = max(1, n_train // bs)
    with jax.enable_x64(False):
        model, optimizer, state = _initial_state(config, per_epoch)
        fill = float(normalize(np.zeros((1, 1), np.uint8))[0, 0, 0])
        adversary = make_adversary(model, config.adv_eps, config.adv_steps) if config.adv_eps > 0 else None
        step = make_train_step(model, optimizer, config.augment, fill, adversary)
        x = jnp.zeros((bs, *INPUT_SHAPE), jnp.float32)
        y = jnp.zeros((bs,), jnp.int32)
        variables, opt_state, key = state["variables"], state["opt_state"], jax.random.key(0)
        times = []
        for _ in range(steps):  # bounded: ``steps`` calls
            t0 = time.perf_counter()
            variables, opt_state, loss, _ = step(variables, opt_state, x, y, key)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
    compile_s = max(0.0, times[0] - float(np.median(times[1:])))
    return compile_s + float(np.median(times[1:])) * per_epoch * config.resolved_epochs()


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | Path,
    *,
    dataset: Dataset | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset``, checkpoint every epoch into ``workdir``.

    Returns:
      A dict with ``variables`` (float32 inference variables), ``metadata``
      (as saved) and ``model`` (the Flax module).

    Raises:
      CheckpointError: ``workdir`` is empty, a file, not writable, holds another run's checkpoint, or is being
        written by another run right now (its writer lock: :func:`jaxrecover.checkpoint.writer`).
    """
    if str(workdir) == "":
        raise CheckpointError("--out is empty; give the checkpoint folder, e.g. --out checkpoints/lenet")
    _check_writable(Path(workdir))
    # the same weights whatever the caller's x64 setting (the CLIs differ: studies and evaluate turn x64 on):
    # training is float32, and with x64 on the schedule and the augmentation would round differently
    with writer(workdir), jax.enable_x64(False):
        return _train(config, workdir, dataset=dataset, resume=resume, progress=progress)


def _train(config, workdir, *, dataset, resume, progress):
    get_model(config.model)  # unknown model -> clear error before any data work
    ds = dataset if dataset is not None else load_dataset(config.dataset)
    xtr, ytr = normalize(ds.train_images, np.float32), ds.train_labels
    xte, yte = normalize(ds.test_images, np.float32), ds.test_labels
    if config.max_train:
        xtr, ytr = xtr[: config.max_train], ytr[: config.max_train]
    if config.max_test:
        xte, yte = xte[: config.max_test], yte[: config.max_test]
    bs = min(config.batch_size, len(xtr))
    steps_per_epoch = len(xtr) // bs
    epochs = config.resolved_epochs()
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError(f"dataset {ds.name} has {len(xtr)} training and {len(xte)} test images; both must be > 0")
    _check_writable(Path(workdir))
    model, optimizer, state = _initial_state(config, steps_per_epoch)
    elapsed = 0.0
    if resume and checkpoint_exists(workdir):
        meta = load_metadata(workdir)
        current = _metadata(config, ds, 0, 0.0, len(xtr), len(xte), 0.0, 0.0)
        for key in RESUME_KEYS:
            if key in meta and meta[key] != current[key]:
                raise CheckpointError(f"checkpoint in {workdir} was trained with {key}={meta[key]!r}, not "
                                      f"{current[key]!r}; resume with the same settings, or use another --out or "
                                      "--no-resume")
        state, meta = load_checkpoint(workdir, state)
        elapsed = float(meta.get("train_seconds", 0.0))
    fill = float(normalize(np.zeros((1, 1), np.uint8))[0, 0, 0])
    adversary = make_adversary(model, config.adv_eps, config.adv_steps) if config.adv_eps > 0 else None
    step = make_train_step(model, optimizer, config.augment, fill, adversary)
    variables, opt_state = state["variables"], state["opt_state"]
    start_epoch = int(state["epoch"])
    meta = None
    test_acc = None
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(xtr))
        key = jax.random.fold_in(jax.random.key(config.seed), epoch)
        bar = tqdm(range(steps_per_epoch), desc=f"{config.model} epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        losses, accs = [], []
        for i in bar:
            idx = order[i * bs : (i + 1) * bs]
            variables, opt_state, loss, acc = step(variables, opt_state, xtr[idx], ytr[idx], jax.random.fold_in(key, i))
            losses.append(loss)
            accs.append(acc)
            if i % 10 == 0 or i == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(acc):.3f}")
        train_loss = float(jnp.mean(jnp.stack(losses)))
        if not np.isfinite(train_loss) or not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(variables)):
            raise FloatingPointError(
                f"{config.model} epoch {epoch + 1}: the loss or the weights became NaN/inf (learning rate "
                f"{config.learning_rate}); nothing of this epoch was saved; lower --lr")
        test_acc = accuracy(model, variables, xte, yte)
        elapsed += time.perf_counter() - t0
        if progress:
            tqdm.write(f"{config.model} epoch {epoch + 1}/{epochs}: loss {train_loss:.4f} "
                       f"train acc {float(jnp.mean(jnp.stack(accs))):.4f} test acc {test_acc:.4f}")
        meta = _metadata(config, ds, epoch + 1, test_acc, len(xtr), len(xte), elapsed, train_loss)
        save_checkpoint(workdir, {"variables": variables, "opt_state": opt_state, "epoch": np.int32(epoch + 1)}, meta)
    if meta is None:  # nothing left to train: report the stored checkpoint
        test_acc = accuracy(model, variables, xte, yte)
        meta = load_checkpoint(workdir, state)[1] if checkpoint_exists(workdir) else _metadata(
            config, ds, start_epoch, test_acc, len(xtr), len(xte), elapsed, float("nan"))
    return {"model": model, "variables": variables, "metadata": meta}


#: Settings a resumed run must share with the checkpoint (else its provenance would be wrong).
RESUME_KEYS = ("model", "dataset", "split", "seed", "batch_size", "learning_rate", "weight_decay", "augment",
               "max_train", "max_test", "adv_eps", "adv_steps")


def _check_writable(workdir: Path) -> None:
    """Fail before any training when the checkpoint folder cannot be written."""
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"--out {workdir} is a file, not a directory; choose another path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {workdir} ({e.strerror}); choose a writable --out") from e


def _metadata(config, ds, epochs_done, test_acc, n_train, n_test, seconds, train_loss) -> dict:
    return {
        "model": config.model,
        "dataset": ds.name,
        "split": ds.split,
        "seed": config.seed,
        "epochs": epochs_done,
        "planned_epochs": config.resolved_epochs(),
        "test_accuracy": test_acc,
        "train_size": n_train,
        "test_size": n_test,
        "train_loss": train_loss,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "augment": config.augment,
        "max_train": config.max_train,
        "max_test": config.max_test,
        "adv_eps": config.adv_eps,
        "adv_steps": config.adv_steps,
        "train_seconds": round(seconds, 2),
        "jax_version": jax.__version__,
        "version": __version__,
    }


def checkpoint_folder(config: TrainConfig) -> str:
    """The folder name of a declared checkpoint: the model (and dataset when not MNIST), then every setting that
    differs from :class:`TrainConfig`'s defaults (epochs: from :data:`DEFAULT_EPOCHS`), e.g. ``twolayer``,
    ``twolayer-epochs10``, ``lenet-epochs8-adv_eps0.5``, ``lenet_fashion_mnist-seed1``."""
    name = config.model
    if config.dataset != "mnist":
        name += "_" + config.dataset.replace(":", "_").replace("/", "_")
    defaults = TrainConfig(model=config.model)
    for f in dataclasses.fields(config):
        if f.name in ("model", "dataset"):
            continue
        mine, base = getattr(config, f.name), getattr(defaults, f.name)
        if f.name == "epochs":
            mine, base = config.resolved_epochs(), defaults.resolved_epochs()
        if mine != base:
            name += f"-{f.name}{mine:g}" if isinstance(mine, float) else f"-{f.name}{mine}"
    return name


def ensure_trained(config: TrainConfig, workdir: str | Path, *, dataset: Dataset | None = None, progress: bool = True,
                   train: bool = True) -> tuple[str, Any, dict]:
    """``load_trained`` of the checkpoint ``config`` declares, trained (or finished) first when missing.

    A finished checkpoint in ``workdir`` made with other settings is an error (its numbers would be labelled
    with a config that did not make them). Training holds the folder's writer lock; a second caller waits for
    it and then loads what the first one trained.

    Raises:
      CheckpointError: the checkpoint differs from ``config``, or is missing and ``train`` is False.
    """
    workdir = Path(workdir)
    if _finished(workdir):
        _check_matches(config, workdir, dataset)
        return load_trained(workdir, model=config.model)
    if not train:
        raise CheckpointError(f"no finished {config.model} checkpoint in {workdir}; train it (python train.py "
                              f"--model {config.model} --epochs {config.resolved_epochs()} --seed {config.seed} "
                              f"--out {workdir}) or allow training")

    def say(holder):
        tqdm.write(f"waiting for another run ({holder}) that is training {workdir} ...")

    with writer(workdir, wait=True, on_wait=say):
        if not _finished(workdir):
            train_and_evaluate(config, workdir, dataset=dataset, progress=progress)
    _check_matches(config, workdir, dataset)
    return load_trained(workdir, model=config.model)


def _finished(workdir: Path) -> bool:
    if not checkpoint_exists(workdir):
        return False
    meta = load_metadata(workdir)
    return int(meta.get("epochs", 0)) >= int(meta.get("planned_epochs", 0))


def _check_matches(config: TrainConfig, workdir: Path, dataset) -> None:
    meta = load_metadata(workdir)
    ds = dataset if dataset is not None else load_dataset(config.dataset)
    want = _metadata(config, ds, config.resolved_epochs(), 0.0, 0, 0, 0.0, 0.0)
    for key in (*RESUME_KEYS, "planned_epochs"):
        if key in meta and meta[key] != want[key]:
            raise CheckpointError(f"the checkpoint in {workdir} was trained with {key}={meta[key]!r}, the study "
                                  f"declares {want[key]!r}; give another --checkpoints folder or delete {workdir}")


def load_trained(workdir: str | Path, model: str | None = None) -> tuple[str, Any, dict]:
    """``(model_name, float32 variables, metadata)`` of a checkpoint written by :func:`train_and_evaluate`.

    Args:
      workdir: the checkpoint directory.
      model: the model expected there; another model's checkpoint is an error.
    """
    meta = load_metadata(workdir)
    if model is not None and meta["model"] != model:
        raise CheckpointError(f"checkpoint {workdir} holds a {meta['model']!r} model, not {model!r}; "
                              f"point to the {model} checkpoint (python train.py --model {model} --out DIR)")
    cfg = TrainConfig(model=meta["model"], learning_rate=meta.get("learning_rate", 1e-3),
                      weight_decay=meta.get("weight_decay", 0.0))
    try:
        get_model(cfg.model)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {workdir} names an unknown model: {e}") from e
    _, _, target = _initial_state(cfg, steps_per_epoch=1)
    state, meta = load_checkpoint(workdir, target)
    return meta["model"], state["variables"], meta
