"""Finding the nearest decision boundary: batched, jitted L2 adversarial searches (Boundary Attribution's first step,
and adversarial training's inner loop).

* ``"pgd"``: L2 PGD as Foolbox's ``L2PGD`` (random start in the ball, normalised cross-entropy gradient ascent,
  projection on the ball, clipping to the input box) over the reference's eps list, keeping each example's
  FIRST success; a larger eps runs only on the examples still failing (batches padded to powers of two);
* ``"cw"``: L2 Carlini-Wagner as Foolbox's ``L2CarliniWagnerAttack`` (tanh box, Adam, 9 binary-search steps of
  the constant, abort early), kept only within the reference's eps = 1.0 (its "clipped" success);
* ``"facet"`` (exact variant for piecewise-linear nets): DeepFool-style steps to the nearest linearised
  boundary, then regula falsi on the segment from the input, so the point has a logit tie to round-off (for a
  linear classifier: the orthogonal projection, exactly), then a descent along the boundary from several starts.

The closest successful point over the methods asked for is returned (the reference keeps the closer of PGD and
CW). Reference settings (zifanw/boundary ``default.py``) are in ``[0, 1]`` pixel units; :class:`InputBox` maps
them to the model's inputs: an L2 distance scales by ``1 / std`` under ``(x - mean) / std``, so eps is multiplied
by ``box.scale``; PGD's relative step ``2 eps / steps`` is computed from the pixel eps, as the reference would on
``[0, 1]`` images; the box becomes ``[(0 - mean) / std, (1 - mean) / std]``.

The explainers that use the point (BSM, BIG, BSG) are in :mod:`jaxrecover.explainers.boundary`; running them
with a search result, and BIG as a service, in :mod:`jaxrecover.attacks.big`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..ops import tuned_jit

__all__ = ["PGD_EPS", "CW_EPS", "SEARCH_METHODS", "InputBox", "BoundaryResult", "pgd_l2", "cw_l2", "facet_l2",
           "boundary_search"]

#: The reference's L2 PGD radii, in [0, 1] pixel units (zifanw/boundary default.py), tried in this order.
PGD_EPS = (36 / 255, 64 / 255, 0.3, 0.5, 0.7, 0.9, 1.1)
#: The reference's L2 Carlini-Wagner radius, in [0, 1] pixel units.
CW_EPS = 1.0
SEARCH_METHODS = ("pgd", "cw", "facet")
#: Points per segment the facet search scans for the first label change before narrowing it down.
SCAN = 8


@dataclasses.dataclass(frozen=True)
class InputBox:
    """The model's input range and its scale against ``[0, 1]`` pixels: ``[lower, upper]`` bounds every
    coordinate (None: unbounded), ``scale`` = model-input units per pixel unit (``1 / std``)."""

    lower: float | None = 0.0
    upper: float | None = 1.0
    scale: float = 1.0

    @classmethod
    def normalized(cls, mean: float, std: float) -> "InputBox":
        """The box of images normalised as ``(x - mean) / std`` from ``[0, 1]``."""
        return cls((0.0 - mean) / std, (1.0 - mean) / std, 1.0 / std)

    @classmethod
    def mnist(cls) -> "InputBox":
        """The box of :func:`jaxrecover.data.normalize`'s MNIST images."""
        from ..data import MNIST_MEAN, MNIST_STD
        return cls.normalized(MNIST_MEAN, MNIST_STD)

    def clip(self, x):
        if self.lower is None and self.upper is None:
            return x
        return jnp.clip(x, self.lower, self.upper)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BoundaryResult:
    """Per example: ``point`` (the boundary point; the input itself where ``success`` is False), ``success``,
    ``distance`` (L2 from the input, model units; inf where not found), ``label`` (the class at ``point``) and
    ``method`` (index into :data:`SEARCH_METHODS`; -1 where not found)."""

    point: Any
    success: Any
    distance: Any
    label: Any
    method: Any


def _norms(d):
    return jnp.sqrt(jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1))


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _argmax(logits):
    return jnp.argmax(logits, axis=1).astype(jnp.int32)


def _predict(model, params, z):
    return _argmax(model.batched(params, z))


@functools.partial(tuned_jit, static_argnames=("model", "steps", "box", "random_start"))
def _pgd_l2(model, params, x, labels, eps, rel_stepsize, key, *, steps: int = 40, box: InputBox = InputBox(),
           random_start: bool = True):
    """Foolbox ``L2PGD`` on a batch: ``(points, success)`` within the L2 ball of radius ``eps`` (model units).

    Step ``rel_stepsize * eps`` along the L2-normalised gradient of the cross-entropy of ``labels`` (ascent),
    projection on the ball, clipping to ``box``; random start uniform in the ball. ``success``: the label
    changed at the final point.
    """
    dtype, labels = x.dtype, labels.astype(jnp.int32)
    eps = jnp.asarray(eps, dtype)
    step = jnp.asarray(rel_stepsize, dtype) * eps

    def loss(z):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model.batched(params, z), labels))

    def project(z):
        d = z - x
        return box.clip(x + d * _bcast(jnp.minimum(1, eps / jnp.maximum(_norms(d), 1e-12)), x))

    if random_start:  # uniform in the ball: a Gaussian direction, radius eps * u^(1/n)
        kd, kr = jax.random.split(key)
        d = jax.random.normal(kd, x.shape, dtype)
        n = int(np.prod(x.shape[1:]))
        r = eps * jax.random.uniform(kr, (x.shape[0],), dtype) ** (1.0 / n)
        z = box.clip(x + d * _bcast(r / jnp.maximum(_norms(d), 1e-12), x))
    else:
        z = x

    def body(_, z):
        g = jax.grad(loss)(z)
        return project(z + step * g / _bcast(jnp.maximum(_norms(g), 1e-12), g))

    z = jax.lax.fori_loop(0, steps, body, z)
    return z, _predict(model, params, z) != labels


@functools.partial(tuned_jit, static_argnames=("model", "steps", "binary_search_steps", "box", "abort_early"))
def _cw_l2(model, params, x, labels, *, steps: int = 100, stepsize: float = 1e-2, binary_search_steps: int = 9,
          initial_const: float = 1e-3, confidence: float = 0.0, box: InputBox = InputBox(),
          abort_early: bool = True):
    """Foolbox ``L2CarliniWagnerAttack`` on a batch: ``(best points, found, their L2 distances)``.

    In tanh space of ``box`` (which must be bounded), Adam on ``c * max(0, z_y - max_{j != y} z_j + confidence)
    + |x' - x|^2`` per example, the constant ``c`` set by binary search (x10 until a success); each example keeps
    its closest adversarial point over all steps. Abort early: an inner loop stops when the summed loss has not
    fallen by 0.01 % over the last tenth of its steps.
    """
    if box.lower is None or box.upper is None:
        raise ValueError("cw_l2 needs a bounded InputBox (Carlini-Wagner works in the box's tanh space)")
    dtype, labels = x.dtype, labels.astype(jnp.int32)
    center, half = (box.upper + box.lower) / 2, (box.upper - box.lower) / 2
    w0 = jnp.arctanh(jnp.clip((x - center) / half, -1, 1) * 0.999999)
    x0 = jnp.tanh(w0) * half + center
    n = x.shape[0]
    opt = optax.adam(stepsize)
    check = max(1, -(-steps // 10))
    onehot = jax.nn.one_hot(labels, model.batched(params, x[:1]).shape[-1], dtype=bool)

    def loss_fn(delta, consts):
        z = jnp.tanh(w0 + delta) * half + center
        logits = model.batched(params, z)
        own = jnp.sum(jnp.where(onehot, logits, 0), axis=1)
        other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=1)
        adv = jnp.maximum(0, own - other + confidence) * consts
        sq = jnp.sum((z - x0).reshape(n, -1) ** 2, axis=1)
        return jnp.sum(adv) + jnp.sum(sq), (z, logits)

    def outer(_, carry):
        consts, lo, hi, best, best_norm = carry
        delta = jnp.zeros_like(x)
        state = opt.init(delta)

        def cond(c):
            return (c[0] < steps) & c[-1]

        def inner(c):
            i, delta, state, found, best, best_norm, prev, _ = c
            (loss, (z, logits)), g = jax.value_and_grad(loss_fn, has_aux=True)(delta, consts)
            with jax.numpy_dtype_promotion("standard"):
                upd, state = opt.update(g, state, delta)
            delta = optax.apply_updates(delta, upd)
            at_check = (i % check) == 0
            go = jnp.logical_not(abort_early & at_check & ~(loss <= 0.9999 * prev))
            prev = jnp.where(at_check, loss, prev)
            is_adv = _argmax(logits) != labels
            found = found | (is_adv & go)
            norms = _norms(z - x0)
            new = is_adv & (norms < best_norm) & go
            best = jnp.where(_bcast(new, x), z, best)
            best_norm = jnp.where(new, norms, best_norm)
            return i + 1, delta, state, found, best, best_norm, prev, go

        init = (0, delta, state, jnp.zeros(n, bool), best, best_norm, jnp.asarray(jnp.inf, dtype), jnp.asarray(True))
        _, _, _, found, best, best_norm, _, _ = jax.lax.while_loop(cond, inner, init)
        hi = jnp.where(found, jnp.minimum(hi, consts), hi)
        lo = jnp.where(found, lo, jnp.maximum(lo, consts))
        consts = jnp.where(jnp.isinf(hi), consts * 10, (lo + hi) / 2)
        return consts, lo, hi, best, best_norm

    init = (jnp.full(n, initial_const, dtype), jnp.zeros(n, dtype), jnp.full(n, jnp.inf, dtype), x0,
            jnp.full(n, jnp.inf, dtype))
    _, _, _, best, best_norm = jax.lax.fori_loop(0, binary_search_steps, outer, init)
    return best, jnp.isfinite(best_norm), jnp.where(jnp.isfinite(best_norm), _norms(best - x), jnp.inf)


@functools.partial(tuned_jit, static_argnames=("model", "max_iter", "bisection", "refine", "box", "multistart",
                                               "starts"))
def _facet_l2(model, params, x, labels, *, max_iter: int = 50, overshoot: float = 0.02, bisection: int | None = None,
              refine: int = 10, box: InputBox = InputBox(None, None), multistart: bool = True,
              starts: int | None = None):
    """Boundary points for piecewise-linear nets, exact on the boundary: ``(points, success)``.

    1. DeepFool steps (to the nearest linearised boundary among the other classes, ``1 + overshoot`` times
       further) until the label changes;
    2. the label change on the segment from the input to that point, narrowed to ``|segment| / 2^bisection``
       (regula falsi on the margin, with a bisection step every third one: at most ``3 bisection`` steps,
       usually a handful) - the point lies on the changed side, a logit tie to round-off (
       default 48 halvings in float64, 26 in float32, whose 24-bit significand makes more pointless);
    3. ``refine`` rounds of projecting the INPUT onto the facet found (the hyperplane of the boundary's
       linear piece at the current point) and bisecting again towards that projection, kept where closer:
       a descent of the distance along the boundary (DeepFool's first point is on the nearest LINEARISED
       boundary, seen from the input, not necessarily the nearest boundary).
    With ``multistart`` (default) this runs from ``K + 1`` starts per example (the nearest linearised boundary,
    and DeepFool aimed at each other class in turn) and keeps the closest point: the descent in 3. is local.
    ``starts``: aim only at that many other classes per example, those whose linearised boundary is nearest
    at the input (default: all K - 1).
    For a linear classifier step 1 lands on the orthogonal projection, which the bisection pins down.
    """
    bisection = bisection if bisection is not None else (26 if x.dtype == jnp.float32 else 48)
    nearest = _facet_one(model, params, x, labels, None, max_iter=max_iter, overshoot=overshoot,
                         bisection=bisection, refine=refine, box=box)
    if not multistart:
        return nearest
    # one more start per example aimed at each other class: the closest point wins
    n = x.shape[0]
    k = model.batched(params, x[:1]).shape[-1]
    labels = labels.astype(jnp.int32)
    if starts is None or starts >= k - 1:
        aim = jnp.repeat(jnp.arange(k, dtype=jnp.int32), n)
    else:  # the classes of the nearest linearised boundaries at x, nearest first
        order = jnp.argsort(_linearised_distances(model, params, x, labels), axis=1)[:, :starts].astype(jnp.int32)
        aim = order.T.reshape(-1)
    reps = aim.shape[0] // n
    xs = jnp.tile(x, (reps,) + (1,) * (x.ndim - 1))
    ls = jnp.tile(labels, reps)
    pts, ok = _facet_one(model, params, xs, ls, aim, max_iter=max_iter, overshoot=overshoot, bisection=bisection,
                         refine=refine, box=box)
    pts = jnp.concatenate([nearest[0], pts])
    ok = jnp.concatenate([nearest[1], ok & (aim != ls)])
    d = jnp.where(ok, _norms(pts - jnp.concatenate([x, xs])), jnp.inf).reshape(reps + 1, n)
    best = jnp.argmin(d, axis=0)
    pts = pts.reshape((reps + 1, n) + x.shape[1:])
    return pts[best, jnp.arange(n)], jnp.any(ok.reshape(reps + 1, n), axis=0)


def _linearised_distances(model, params, x, labels):
    """``|f_j - f_label| / |grad (f_j - f_label)|`` at ``x`` per example and class ``[B, K]`` (inf at the label):
    the distance to each class's linearised boundary."""
    def margins(z):
        logits = model.batched(params, z)
        return logits - jnp.take_along_axis(logits, labels[:, None], axis=1)
    vals, vjp = jax.vjp(margins, x)
    k = vals.shape[1]
    grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, vals.shape))[0])(jnp.eye(k, dtype=x.dtype))  # [K, B, ...]
    gn = jnp.sqrt(jnp.sum(grads.reshape(k, x.shape[0], -1) ** 2, axis=2)).T
    own = jax.nn.one_hot(labels, k, dtype=bool)
    return jnp.where(own | (gn == 0), jnp.inf, jnp.abs(vals) / jnp.maximum(gn, 1e-30))


def _facet_one(model, params, x, labels, aim, *, max_iter, overshoot, bisection, refine, box):
    """One start per example, heading for the nearest linearised boundary (``aim`` None: needs every class's
    gradient per step) or for class ``aim [B]`` (one gradient per step)."""
    dtype, labels = x.dtype, labels.astype(jnp.int32)
    k = model.batched(params, x[:1]).shape[-1]
    own_mask = jax.nn.one_hot(labels, k, dtype=bool)

    def take(a, j):
        return jnp.take_along_axis(a, j[:, None], axis=1)[:, 0]

    def margin_grad(z, j):
        """``f_j - f_label`` per example and its input gradient (one backward pass)."""
        def total(zz):
            logits = model.batched(params, zz)
            return jnp.sum(take(logits, j) - take(logits, labels)), logits
        (_, logits), g = jax.value_and_grad(total, has_aux=True)(z)
        return take(logits, j) - take(logits, labels), g, logits

    def all_margins_and_grads(z):
        def m(zz):
            logits = model.batched(params, zz)
            return logits - jnp.take_along_axis(logits, labels[:, None], axis=1)  # [B, K], 0 at the label
        vals, vjp = jax.vjp(m, z)
        grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, vals.shape))[0])(jnp.eye(k, dtype=dtype))  # [K, B, ...]
        return vals, jnp.moveaxis(grads, 0, 1)

    def cond(c):
        i, z, done = c
        return (i < max_iter) & ~jnp.all(done)

    def body(c):
        i, z, done = c
        if aim is None:
            vals, grads = all_margins_and_grads(z)
            gn = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], k, -1) ** 2, axis=2))
            ratio = jnp.where(own_mask | (gn == 0), jnp.inf, jnp.abs(vals) / jnp.maximum(gn, 1e-30))
            j = jnp.argmin(ratio, axis=1).astype(jnp.int32)
            gj = jnp.take_along_axis(grads, _bcast(j, grads), axis=1)[:, 0]
            vj = take(vals, j)
        else:
            vj, gj, _ = margin_grad(z, aim)
        gnj = _norms(gj)
        r = _bcast((jnp.abs(vj) + 1e-12) / jnp.maximum(gnj, 1e-30) ** 2, x) * gj
        # the overshoot doubles with every step still short of the boundary: DeepFool can ping-pong between the
        # linear pieces on either side of a kink; the crossing is narrowed down from the input afterwards anyway
        grow = jnp.asarray(2.0, x.dtype) ** jnp.minimum(i, 20).astype(x.dtype)
        z = jnp.where(_bcast(done, x), z, box.clip(z + (1 + overshoot * grow) * r))
        done = done | (_predict(model, params, z) != labels)
        return i + 1, z, done

    def margin(z):
        """``f_label - max_{j != label} f_j`` (> 0 where the label is kept) and whether the label changed."""
        logits = model.batched(params, z)
        other = jnp.max(jnp.where(own_mask, -jnp.inf, logits), axis=1)
        return take(logits, labels) - other, _argmax(logits) != labels

    def clearly_changed(z):
        """Changed by more than round-off: the same rows evaluated in another batch (another rounding) agree."""
        logits = model.batched(params, z)
        other = jnp.max(jnp.where(own_mask, -jnp.inf, logits), axis=1)
        tol = 64 * jnp.finfo(dtype).eps * jnp.max(jnp.abs(logits), axis=1)
        return take(logits, labels) - other < -tol

    def on_boundary(far):
        """The label change on the segment x -> far (kept at x, changed at far), to a bracket of width
        ``2^-bisection``: Illinois regula falsi on the margin, a piecewise-linear function of the fraction t (a
        secant step inside one linear piece lands on the root), a bisection step every third iteration (the
        bracket keeps shrinking across kinks); rows stop once narrow, the loop once all are."""
        n = x.shape[0]
        width = jnp.asarray(2.0 ** -bisection, dtype)

        def active(c):
            i, lo, hi = c[0], c[1], c[2]
            return (i < 3 * bisection) & jnp.any(hi - lo > width)

        def step(c):
            i, lo, hi, m_lo, m_hi, last = c  # fractions: label kept at lo (m_lo > 0), changed at hi (m_hi <= 0)
            go = hi - lo > width
            secant = (lo * m_hi - hi * m_lo) / jnp.where(m_hi != m_lo, m_hi - m_lo, 1)
            inside = (m_hi != m_lo) & (secant > lo) & (secant < hi)
            mid = (lo + hi) / 2
            # a tie kept at lo (margin exactly 0): the change is a few ulps past it
            nudge = jnp.minimum(lo + 4 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(hi), 1e-30), mid)
            t = jnp.where(m_lo == 0, nudge, jnp.where(inside & (i % 3 != 2), secant, mid))
            m, changed = margin(x + _bcast(t, x) * (far - x))
            up, down = go & changed, go & ~changed  # rows already narrow keep their bracket
            # Illinois: an end kept twice in a row has its margin halved, so the secant moves past it
            m_lo = jnp.where(up & (last == 1), m_lo / 2, jnp.where(down, m, m_lo))
            m_hi = jnp.where(down & (last == -1), m_hi / 2, jnp.where(up, m, m_hi))
            lo, hi = jnp.where(down, t, lo), jnp.where(up, t, hi)
            return i + 1, lo, hi, m_lo, m_hi, jnp.where(up, 1, jnp.where(down, -1, last)).astype(jnp.int32)

        # the FIRST change among SCAN equally spaced points (one batched call): the crossing nearest the input,
        # at that resolution, is the one narrowed down (the label can change back and forth along the segment)
        ts = jnp.arange(SCAN + 1, dtype=dtype) / SCAN                                     # [S + 1]
        zs = x[None] + ts.reshape((-1,) + (1,) * x.ndim) * (far - x)[None]                 # [S + 1, n, ...]
        logits = model.batched(params, zs.reshape((-1,) + x.shape[1:])).reshape(SCAN + 1, n, k)
        ms = (jnp.take_along_axis(logits, labels[None, :, None], axis=2)[..., 0]
              - jnp.max(jnp.where(own_mask[None], -jnp.inf, logits), axis=2))
        ch = (jnp.argmax(logits, axis=2).astype(jnp.int32) != labels[None]).at[SCAN].set(True)  # far: changed
        first = jnp.argmax(ch, axis=0)                                                      # first change, >= 1
        pick = (lambda a, j: jnp.take_along_axis(a, j[None], axis=0)[0])
        lo, hi = ts[first - 1], ts[first]
        m_lo, m_hi = pick(ms, first - 1), jnp.minimum(pick(ms, first), 0)
        init = (0, lo, hi, m_lo, m_hi, jnp.zeros(n, jnp.int32))
        _, _, hi, _, _, _ = jax.lax.while_loop(active, step, init)

        # a tie to round-off can read as unchanged when evaluated again (another batch, another rounding):
        # move out by growing numbers of ulps until the label changed clearly (usually one check)
        # (past far too: far itself can be such a tie when DeepFool's last step was tiny)
        def unchanged(c):
            j, t = c
            return (j < 12) & jnp.any(~clearly_changed(x + _bcast(t, x) * (far - x)) & (t < 2))

        def push(c):
            j, t = c
            changed = clearly_changed(x + _bcast(t, x) * (far - x))
            step_out = 16.0 * 4.0 ** j.astype(dtype) * jnp.finfo(dtype).eps
            return j + 1, jnp.where(changed, t, jnp.minimum(t * (1 + step_out), 2))

        _, hi = jax.lax.while_loop(unchanged, push, (jnp.asarray(0), hi))
        return x + _bcast(hi, x) * (far - x)

    _, far, done = jax.lax.while_loop(cond, body, (0, x, jnp.zeros(x.shape[0], bool)))
    point = on_boundary(far)

    def better(_, point):
        logits = model.batched(params, point)
        j = jnp.argmax(jnp.where(own_mask, -jnp.inf, logits), axis=1).astype(jnp.int32)  # the class crossed to
        g, n_, _ = margin_grad(point, j)
        # the facet {z: g + n.(z - point) = 0}; the input's projection onto it, pushed a little past
        lin = g + jnp.sum((n_ * (x - point)).reshape(x.shape[0], -1), axis=1)
        q = x - _bcast(lin / jnp.maximum(_norms(n_) ** 2, 1e-30), x) * n_
        target = box.clip(x + (1 + overshoot) * (q - x))
        crosses = _predict(model, params, target) != labels
        cand = on_boundary(jnp.where(_bcast(crosses, x), target, far))
        closer = crosses & (_norms(cand - x) < _norms(point - x))
        return jnp.where(_bcast(closer, x), cand, point), jnp.any(closer)

    def more(c):
        i, _, moved = c
        return (i < refine) & moved

    def refine_round(c):
        i, point, _ = c
        point, moved = better(i, point)
        return i + 1, point, moved

    # rounds stop early once no example of the batch got closer in the last one
    _, point, _ = jax.lax.while_loop(more, refine_round, (0, point, jnp.asarray(refine > 0)))
    return point, done


def _public(impl):
    """``impl`` with its model given as a :class:`jaxrecover.models.Model` or a plain ``logit_fn``."""
    @functools.wraps(impl)
    def run(model, *args, **kwargs):
        from ..models import as_model
        return impl(as_model(model), *args, **kwargs)
    return run


pgd_l2, cw_l2, facet_l2 = _public(_pgd_l2), _public(_cw_l2), _public(_facet_l2)


def boundary_search(model, params, x, labels, *, methods=("pgd", "cw"), box: InputBox | None = None,
                    eps=PGD_EPS, pgd_steps: int = 40, cw_eps: float = CW_EPS, cw_steps: int = 100,
                    cw_stepsize: float = 1e-2, facet_starts: int | None = None, seed: int = 0,
                    progress: bool = False) -> BoundaryResult:
    """The closest boundary point per example over ``methods`` (see the module docstring), batched.

    Args:
      model: a :class:`jaxrecover.models.Model` (or ``logit_fn(params, x_one)``).
      x: ``[N, ...]`` inputs; labels: ``[N]`` the classes whose boundary is searched: the model's predictions
        (an example predicted otherwise is already past the boundary: distance 0 or close to it).
      box: the input range and its pixel scale (default: MNIST as :func:`jaxrecover.data.normalize` makes it).
      eps, cw_eps: positive L2 radii in pixel units (scaled by ``box.scale``).
      facet_starts: the facet search's aimed starts per example (the classes of the nearest linearised
        boundaries; default all K - 1; fewer is faster and rarely farther, see docs/BOUNDARY.md).

    An example the model already assigns to a class other than its label is returned as its own boundary
    point: distance 0, success, ``method`` -1 (no search was needed).

    Raises:
      ValueError: labels outside ``[0, K)``, a radius outside ``(0, 1]`` or NaN, NaN/inf inputs, an empty batch.
    """
    from ..models import as_model
    model = as_model(model)
    unknown = set(methods) - set(SEARCH_METHODS)
    if unknown or not methods:
        raise ValueError(f"unknown boundary search methods {sorted(unknown)}; choose from {SEARCH_METHODS}")
    from .. import validate
    from ..engine import check_finite

    box = InputBox.mnist() if box is None else box
    eps = [validate.radius("eps", e, hi=np.inf) for e in np.atleast_1d(np.asarray(eps, dtype=object))]
    cw_eps = validate.radius("cw_eps", cw_eps, hi=np.inf)
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"boundary_search needs a non-empty batch x[N, ...], got shape {tuple(x.shape)}")
    check_finite("x", x)
    logits = jax.eval_shape(lambda p, z: jax.vmap(lambda zi: model(p, zi))(z), params, x)
    labels = jnp.asarray(validate.class_labels(labels, x.shape[0], int(logits.shape[-1]), what="labels"))
    n, dtype = x.shape[0], x.dtype
    # an example the model already assigns to another class is past its boundary: distance 0 (the docstring's
    # promise; PGD would otherwise report the distance to a point of some third class)
    already = np.asarray(_predict(model, params, x)) != np.asarray(labels)
    point, dist = x, jnp.full(n, jnp.inf, dtype)
    method = jnp.full(n, -1, jnp.int32)

    def keep(p, ok, idx):
        nonlocal point, dist, method
        d = jnp.where(ok, _norms(p - x), jnp.inf)
        better = d < dist
        point = jnp.where(_bcast(better, x), p, point)
        dist = jnp.where(better, d, dist)
        method = jnp.where(better, idx, method)

    if "pgd" in methods:
        found, ok = x, jnp.zeros(n, bool)
        key = jax.random.key(seed)
        for e in eps:  # the first eps that succeeds, per example; later radii only on the examples still failing
            key, sub = jax.random.split(key)
            todo = np.flatnonzero(~np.asarray(ok))
            if todo.size == 0:
                break
            size = min(n, 1 << int(np.ceil(np.log2(todo.size))))  # padded to a power of two: few batch shapes
            idx = jnp.asarray(np.concatenate([todo, np.full(size - todo.size, todo[0])]))
            p, s = _pgd_l2(model, params, x[idx], labels[idx], e * box.scale, 2 * e / pgd_steps, sub,
                           steps=pgd_steps, box=box)
            s = np.asarray(s)[:todo.size]
            new = jnp.asarray(todo[s])
            found = found.at[new].set(p[:todo.size][s])
            ok = ok.at[new].set(True)
            if progress:
                print(f"PGD eps {e:.3f}: {int(ok.sum())}/{n} found")
        keep(found, ok, SEARCH_METHODS.index("pgd"))
    if "cw" in methods:
        p, ok, d = _cw_l2(model, params, x, labels, steps=cw_steps, stepsize=cw_stepsize, box=box)
        keep(p, ok & (d <= cw_eps * box.scale), SEARCH_METHODS.index("cw"))
    if "facet" in methods:
        p, ok = _facet_l2(model, params, x, labels, box=box, starts=facet_starts)
        keep(p, ok, SEARCH_METHODS.index("facet"))
    if already.any():
        a = jnp.asarray(already)
        point = jnp.where(_bcast(a, x), x, point)
        dist = jnp.where(a, jnp.zeros_like(dist), dist)
        method = jnp.where(a, jnp.full_like(method, -1), method)
    success = jnp.isfinite(dist)
    return BoundaryResult(point=point, success=success, distance=dist, label=_predict(model, params, point),
                          method=method)
