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

__all__ = ["CLONE_KINDS", "CloneData", "train_clone", "clone_metrics"]

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
    def one(xi, li, ti, ai, bi):
        s_fn = lambda z: model(params, z)  # noqa: E731
        s = s_fn(xi)
        loss = jnp.mean((s - li) ** 2)
        if kind != "logits":
            g = jax.grad(lambda z: s_fn(z)[ti])(xi)
            u = g * (xi - bi) if kind == "ig" else g
            loss = loss + grad_weight * jnp.sum((u - ai) ** 2) / jnp.maximum(jnp.sum(ai ** 2), 1e-30)
        return loss

    return jnp.mean(jax.vmap(one)(x, logits, target, answers, baseline))


@functools.partial(jax.jit, static_argnames=("model", "kind", "optimizer"))
def _steps(model, kind, optimizer, grad_weight, params, opt_state, arrays, idx):
    """``len(idx)`` Adam steps in one compiled ``lax.scan`` (batch ``arrays[idx[i]]`` at step ``i``)."""
    def step(carry, rows):
        params, opt_state = carry
        batch = tuple(a[rows] for a in arrays)
        loss, grads = jax.value_and_grad(lambda p: _loss(model, kind, grad_weight, p, *batch))(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats (as training.py)
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state, losses


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
    dtype = jax.tree.leaves(params)[0].dtype
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
    chunk = 100
    with tqdm(total=steps, desc=f"clone ({kind}, B = {n})", unit="step", disable=not progress) as bar:
        for s in range(0, steps, chunk):  # (a shorter last chunk compiles once more)
            params, opt_state, loss = _steps(model, kind, optimizer, gw, params, opt_state, arrays,
                                             jnp.asarray(idx[s:s + chunk]))
            losses.extend(np.asarray(loss).tolist())
            bar.update(len(idx[s:s + chunk]))
    return params, np.asarray(losses)


def clone_metrics(student, student_params, victim, victim_params, x, labels) -> dict:
    """Agreement of predictions with the victim, test accuracy, and the mean paper's distance between the
    student's and the victim's VG of the victim's predicted class, on inputs ``x`` with true ``labels``."""
    from ..metrics import normalized_distance
    from ..models import as_model
    student, victim = as_model(student), as_model(victim)
    x = jnp.asarray(x)
    vl = jax.vmap(lambda z: victim(victim_params, z))(x)
    sl = jax.vmap(lambda z: student(student_params, z.astype(jax.tree.leaves(student_params)[0].dtype)))(x)
    pred = jnp.argmax(vl, axis=1)
    vg_v = jax.vmap(lambda z, k: jax.grad(lambda u: victim(victim_params, u)[k])(z))(x, pred)
    vg_s = jax.vmap(lambda z, k: jax.grad(lambda u: student(student_params, u)[k])(z))(
        x.astype(jax.tree.leaves(student_params)[0].dtype), pred)
    d = normalized_distance(vg_s.astype(jnp.float64), vg_v.astype(jnp.float64))
    return {"agreement": float(jnp.mean(jnp.argmax(sl, axis=1) == pred)),
            "accuracy": float(jnp.mean(jnp.argmax(sl, axis=1) == jnp.asarray(labels))),
            "vg_distance": float(jnp.nanmean(d))}
