"""Clone training: a student model fitted to a victim's answers (logits, IG answers, or recovered VG).

Where exact extraction is out of reach (LeNet), the attacker trains a student on what the queries returned:

* ``"logits"``: the victim's logits at the query inputs (mean squared error on logits);
* ``"ig"``: logits, plus the IG answers as they come, read as gradient x (input - baseline) of the explained
  class (the student's ``(x - b) * grad s_k(x)`` is matched to the answer);
* ``"vg"``: logits, plus the Vanilla Gradient recovered from IG answers (Sobolev training: the student's
  ``grad s_k(x)`` is matched to it).

Gradient terms are relative squared errors (``|u - g|^2 / |g|^2`` per example) weighted by ``grad_weight``;
one jitted optax step per batch. :func:`clone_metrics` measures a student against the victim: prediction
agreement, accuracy, and the paper's distance between the two VGs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ..ops import tuned_jit
from ..validate import float_dtype

__all__ = ["CLONE_KINDS", "CloneData", "train_clone", "clone_metrics", "victim_reference"]

CLONE_KINDS = ("logits", "ig", "vg")


@dataclasses.dataclass
class CloneData:
    """What the attacker's queries returned: inputs ``x [B, ...]``, the victim's ``logits [B, K]``, and for the
    gradient kinds the explained class ``target [B]``, the answers ``answers [B, ...]`` (IG answers or recovered
    VG) and the service's ``baseline [B, ...]`` (kind "ig")."""

    x: np.ndarray
    logits: np.ndarray
    target: np.ndarray | None = None
    answers: np.ndarray | None = None
    baseline: np.ndarray | None = None


def _loss(model, kind, grad_weight, params, x, logits, target, answers, baseline):
    apply = model.batched
    s = apply(params, x)
    loss = jnp.mean((s - logits) ** 2, axis=1)
    if kind != "logits":
        # examples are independent in inference mode, so the gradient of the summed explained logits is every
        # example's own input gradient
        g = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(apply(params, z), target[:, None], axis=1)))(x)
        u = g * (x - baseline) if kind == "ig" else g
        axes = tuple(range(1, x.ndim))
        loss = loss + grad_weight * jnp.sum((u - answers) ** 2, axis=axes) / jnp.maximum(
            jnp.sum(answers ** 2, axis=axes), 1e-30)
    return jnp.mean(loss)


@functools.partial(tuned_jit, static_argnames=("model", "kind", "optimizer"), donate_argnums=(5, 6))
def _step(model, kind, optimizer, grad_weight, arrays, params, opt_state, rows):
    """One Adam step on the batch ``arrays[rows]``.

    One compiled step called from Python, not a ``lax.scan`` of steps: inside XLA:CPU's while loop the
    convolutions and their gradients ran 6-20x slower (LeNet student, batch 64: 1.3 s against 0.07 s a step).
    """
    batch = tuple(a[rows] for a in arrays)
    loss, grads = jax.value_and_grad(lambda p: _loss(model, kind, grad_weight, p, *batch))(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats (as training.py)
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_clone(model, params, data: CloneData, *, kind: str, steps: int = 1000, batch: int = 64,
                learning_rate: float = 1e-3, grad_weight: float = 1.0, seed: int = 0, progress: bool = True):
    """Train ``params`` of the student ``model`` on ``data``; returns ``(params, losses)``.

    Args:
      model: a :class:`jaxrecover.models.Model` or ``logit_fn(params, x_one)`` (the student).
      params: its initial parameters (their float dtype is the training dtype).
      data: the queries' answers (:class:`CloneData`); kind "ig" and "vg" need ``target`` and ``answers``.
      kind: one of :data:`CLONE_KINDS`.
      steps, batch, learning_rate: Adam steps on batches drawn with replacement from the ``B`` examples.
      grad_weight: weight of the gradient term.
    """
    from ..models import as_model
    if kind not in CLONE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(CLONE_KINDS)}")
    model = as_model(model)
    dtype = float_dtype(params)
    n = int(np.shape(data.x)[0])
    if n < 1 or np.shape(data.logits)[0] != n:
        raise ValueError(f"data has {n} inputs and {np.shape(data.logits)[0]} logit rows; they must match (>= 1)")
    if kind != "logits" and (data.target is None or data.answers is None):
        raise ValueError(f"kind {kind!r} needs data.target and data.answers (the explained class and its answers)")
    x = jnp.asarray(data.x, dtype)
    arrays = (x, jnp.asarray(data.logits, dtype),
              jnp.asarray(data.target if data.target is not None else np.zeros(n), jnp.int32),
              jnp.asarray(data.answers, dtype) if data.answers is not None else jnp.zeros_like(x),
              jnp.asarray(data.baseline, dtype) if data.baseline is not None else jnp.zeros_like(x))
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    idx = np.random.default_rng(seed).integers(0, n, (steps, min(batch, n)))
    losses = []
    gw = jnp.asarray(grad_weight, dtype)
    params = jax.tree.map(jnp.array, params)  # a copy: the steps donate their buffers
    with tqdm(total=steps, desc=f"clone ({kind}, B = {n})", unit="step", disable=not progress) as bar:
        for rows in idx:
            params, opt_state, loss = _step(model, kind, optimizer, gw, arrays, params, opt_state, jnp.asarray(rows))
            losses.append(loss)
            bar.update(1)
        losses = np.asarray(jax.device_get(losses))
    return params, losses


@functools.partial(jax.jit, static_argnames="model")
def _logits_and_vg(model, params, x, classes=None):
    """Logits of every row of ``x`` and the VG of class ``classes[i]`` (default: the row's own prediction), in
    the parameters' dtype."""
    x = x.astype(float_dtype(params))
    apply = model.batched
    logits = apply(params, x)
    classes = jnp.argmax(logits, axis=1) if classes is None else classes
    vg = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(apply(params, z), classes[:, None], axis=1)))(x)
    return logits, vg


def victim_reference(victim, victim_params, x) -> tuple[jax.Array, jax.Array]:
    """The victim's predictions on ``x`` and the VG of each predicted class: compute once, pass to
    :func:`clone_metrics` for every student."""
    from ..models import as_model
    logits, vg = _logits_and_vg(as_model(victim), victim_params, jnp.asarray(x))
    return jnp.argmax(logits, axis=1), vg


def clone_metrics(student, student_params, victim, victim_params, x, labels, *, reference=None) -> dict:
    """Agreement of predictions with the victim, test accuracy, and the mean paper's distance between the
    student's and the victim's VG of the victim's predicted class, on inputs ``x`` with true ``labels``.

    ``reference``: :func:`victim_reference` of the same victim and ``x`` (saves recomputing it per student).
    """
    from ..metrics import normalized_distance
    from ..models import as_model
    pred, vg_v = reference if reference is not None else victim_reference(victim, victim_params, x)
    logits, vg_s = _logits_and_vg(as_model(student), student_params, jnp.asarray(x), pred)
    d = normalized_distance(vg_s.astype(jnp.float64), vg_v.astype(jnp.float64))
    return {"agreement": float(jnp.mean(jnp.argmax(logits, axis=1) == pred)),
            "accuracy": float(jnp.mean(jnp.argmax(logits, axis=1) == jnp.asarray(labels))),
            "vg_distance": float(jnp.nanmean(d))}
