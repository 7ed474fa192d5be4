"""PatternNet and PatternAttribution (Kindermans et al., ICLR 2018): signal estimators learned from data.

Per kernel layer (Dense; Conv through image patches, every output position one sample) with kernel ``w``
and output ``y = w^T x`` (pre-activation WITHOUT bias), a signal estimator ``S(x) = a y`` is fitted per
output unit from the data:

* ``"w"`` (S_w, the filter itself): ``a = w / (w^T w)`` (DeConvNet / guided backprop direction);
* ``"linear"`` (S_a): ``a = cov[x, y] / (w^T cov[x, y])`` (``w^T cov[x, y] = var y``);
* ``"relu"`` (S_a+-, the two-component estimator): ``a_+ = (E+[x y] - E+[x] E[y]) / (w^T E+[x y] - w^T E+[x] E[y])``,
  ``E+`` over the samples where the unit's ReLU output is positive (bias included), ``E[y]`` over all.
  For the last layer (no ReLU after it) every sample counts, so it equals ``"linear"``.
* ``S_x`` (identity) has no pattern: its attribution is gradient x input (:func:`vanilla_gradient` times x).

Statistics are running sums (:class:`LayerStats`): one pass over the data, chunked (memory independent of
the number of examples), accumulated in float64 when x64 is on; sums of two halves merged equal the sums of
the whole (:meth:`LayerStats.merge`). :func:`fit_patterns` runs the pass; :func:`patterns_from_stats` turns
the sums into patterns in the kernels' shapes.

The explainers (:class:`PatternNet`, :class:`PatternAttribution`) run the gradient's backward pass with each
kernel replaced by its pattern (PatternNet) or by ``kernel * pattern`` (PatternAttribution), ReLU gates and
max-pool routing from the forward pass with the real weights; like iNNvestigate, the backward pass starts from
the explained output's value (not 1). Sequential ReLU nets only (TwoLayerNet, LeNet, with or without bias, or
your own Flax Linen or NNX net of Dense and 2-D Conv layers): BatchNorm and residual connections are outside
the method as published and are refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from ..models import layers as L
from .gradients import select_output
from .methods import Explainer, explainer_dataclass
from ..validate import float_dtype

__all__ = ["ESTIMATORS", "LayerStats", "layer_stats", "patterns_from_stats", "fit_patterns", "PatternNet",
           "PatternAttribution", "kernel_layers", "signal_quality",
           "layer_samples", "layer_signal_quality", "flatten_kernel", "kernel_from_pattern"]

ESTIMATORS = ("w", "linear", "relu")


# ---------------------------------------------------------------------------------------------- statistics
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStats:
    """Running sums of one layer over samples (rows): ``x [n, d]`` inputs, ``y [n, u]`` outputs without bias,
    ``mask [n, u]`` where each unit's ReLU output is positive."""

    n: Any           # number of samples
    sx: Any          # sum x            [d]
    sy: Any          # sum y            [u]
    sxy: Any         # sum x y^T        [d, u]
    npos: Any        # sum mask         [u]
    spx: Any         # sum mask x       [d, u]
    spxy: Any        # sum mask x y     [d, u]

    def merge(self, other: "LayerStats") -> "LayerStats":
        """The sums over both sets of samples."""
        return LayerStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def layer_stats(x, y, mask, dtype=None) -> LayerStats:
    """:class:`LayerStats` of samples ``x [n, d]``, ``y [n, u]`` (no bias) and ``mask [n, u]`` (bool), summed in
    ``dtype`` (default: x's)."""
    dtype = dtype or x.dtype
    x, y, m = x.astype(dtype), y.astype(dtype), mask.astype(dtype)
    return LayerStats(n=jnp.asarray(x.shape[0], dtype), sx=x.sum(0), sy=y.sum(0), sxy=x.T @ y, npos=m.sum(0),
                      spx=x.T @ m, spxy=x.T @ (m * y))


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def patterns_from_stats(stats: LayerStats, w) -> dict[str, jax.Array]:
    """The patterns ``{"w", "linear", "relu", "relu_neg"}`` (each ``[d, u]``, like ``w``) from a layer's sums and
    its flat kernel ``w [d, u]``. ``"relu_neg"`` is the two-component estimator's ``a_-`` (the negative regime;
    it enters the signal estimate and rho, not the backward pass, where the ReLU gate is closed). Units never
    active get a zero "relu" pattern (they pass no gradient anyway)."""
    w = jnp.asarray(w, stats.sxy.dtype)
    n = stats.n
    ex, ey = stats.sx / n, stats.sy / n
    cov = stats.sxy / n - ex[:, None] * ey[None, :]
    linear = _safe_div(cov, jnp.sum(w * cov, axis=0, keepdims=True))
    npos = stats.npos[None, :]
    num = _safe_div(stats.spxy, npos) - _safe_div(stats.spx, npos) * ey[None, :]
    relu = _safe_div(num, jnp.sum(w * num, axis=0, keepdims=True))
    nneg = n - npos  # the negative regime: the whole minus the positive sums
    num_neg = _safe_div(stats.sxy - stats.spxy, nneg) - _safe_div(stats.sx[:, None] - stats.spx, nneg) * ey[None, :]
    relu_neg = _safe_div(num_neg, jnp.sum(w * num_neg, axis=0, keepdims=True))
    return {"w": w / jnp.sum(w * w, axis=0, keepdims=True), "linear": linear, "relu": relu, "relu_neg": relu_neg}


# ---------------------------------------------------------------------------------------------- the model's layers
def _check_supported(model, params):
    if not L.has_layers(model):
        raise NotImplementedError(f"patterns need a Flax Linen or NNX model of Dense/Conv layers; {model.name!r} is a "
                                  "plain function (pass the module: jaxrecover.as_model(module))")
    if "batch_stats" in params or any("BatchNorm" in k or "Block" in k for k in model.kernels(params)):
        raise ValueError(f"{model.name}: BatchNorm and residual connections are outside PatternNet as published "
                         "(iNNvestigate refuses them too); use a sequential ReLU net (twolayer, lenet, *_nobias)")


def _flat_kernel(kind, kernel):
    """The kernel as ``[d, u]`` matching :func:`jaxrecover.models.layers.patches` (conv: features (C, kh, kw))."""
    if kind == "conv":
        kh, kw, c, u = kernel.shape
        return kernel.transpose(2, 0, 1, 3).reshape(c * kh * kw, u)
    return kernel


def flatten_kernel(kernel):
    """A Dense kernel as is, a Conv kernel ``[kh, kw, C, u]`` as ``[C * kh * kw, u]`` (the order of the patch
    features :func:`layer_samples` gives): patterns come in kernel shapes, rho works on flat ones."""
    return _flat_kernel("conv" if np.ndim(kernel) == 4 else "dense", kernel)


def _unflat_kernel(module_kind, flat, shape):
    if module_kind == "conv":
        kh, kw, c, u = shape
        return flat.reshape(c, kh, kw, u).transpose(1, 2, 0, 3)
    return flat


def _capture(model, params, x):
    """Run the model on a batch; ``({path: (layer, input, output with bias)}, logits)`` in call order."""
    seen = {}

    def hook(layer, xin, out):
        seen[layer.path] = (layer, xin, out)
        return out

    logits = L.run_with_hook(model, params, x, hook)
    return seen, logits


def _layers(model, params, images=None) -> dict:
    """``{path: Layer}`` of the kernel layers, in call order (the input shape: the model's, or ``images``')."""
    shape = model.input_shape if model.input_shape is not None else (
        None if images is None else tuple(images.shape[1:]))
    if shape is None:
        raise ValueError(f"the input shape of {model.name!r} is unknown: jaxrecover.as_model(module, example=x[0])")
    return L.kernel_layers(model, params, shape)


def kernel_layers(model, params, images=None) -> list[str]:
    """The paths of the model's kernel layers in call order (the last one produces the logits); ``images``
    (a batch) give the input shape where the model does not know it."""
    _check_supported(model, params)
    return list(_layers(model, params, images))


def fit_patterns(model, params, images, *, chunk: int = 256, accumulate=None, progress: bool = True):
    """Fit every kernel layer's patterns in ONE pass over ``images [N, ...]`` (chunks of ``chunk``).

    Args:
      model: a :class:`jaxrecover.models.Model` of a sequential ReLU net (TwoLayerNet, LeNet, with or
        without bias).
      params: its variables.
      images: inputs in the params' dtype.
      accumulate: the dtype of the running sums (default float64 when x64 is on, else float32).

    Returns:
      ``{layer path: {"w": ..., "linear": ..., "relu": ...}}``, each pattern in its kernel's shape and the
      params' dtype.
    """
    _check_supported(model, params)
    images = jnp.asarray(images)
    pdtype = float_dtype(params)
    if images.dtype != pdtype:
        raise TypeError(f"images are {images.dtype} but the params are {pdtype}; cast the images")
    want = model.input_shape if model.input_shape is not None else images.shape[1:]
    if images.ndim != 1 + len(want) or tuple(images.shape[1:]) != tuple(want) or images.shape[0] < 2:
        raise ValueError(f"images must be [N >= 2, {', '.join(map(str, want))}], got {images.shape}")
    acc = jnp.dtype(accumulate) if accumulate is not None else (
        jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    if acc == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("float64 accumulation needs jax_enable_x64; enable it or pass accumulate=jnp.float32")
    layers = kernel_layers(model, params, images)
    last = layers[-1]

    @jax.jit
    def batch_stats(p, xb):
        seen, _ = _capture(model, p, xb)
        out = {}
        for path, (layer, xin, y) in seen.items():
            w = _flat_kernel(layer.kind, _lookup(p["params"], path)["kernel"])
            xs = L.patches(layer, xin)
            ys = xs @ w
            mask = (y.reshape(-1, y.shape[-1]) > 0) if path != last else jnp.ones(ys.shape, bool)
            out[path] = layer_stats(xs, ys, mask, acc)
        return out

    total = None
    n = images.shape[0]
    for s in tqdm(range(0, n, chunk), desc="pattern statistics", unit="chunk", disable=not progress):
        part = batch_stats(params, images[s:s + chunk])
        total = part if total is None else {k: total[k].merge(part[k]) for k in total}
    kernels = model.kernels(params)
    kinds = {path: layer.kind for path, layer in _layers(model, params, images).items()}
    out = {}
    for path in layers:
        k = kernels[path]
        flat = _flat_kernel(kinds[path], k)
        pats = patterns_from_stats(total[path], flat)
        flat_w = jnp.asarray(flat, total[path].sxy.dtype)
        const = np.asarray(constant_units(total[path], flat_w,
                                          float(jnp.finfo(pdtype).eps) ** 2 + float(jnp.finfo(acc).eps)))
        if const.all():
            raise ValueError(f"every unit of layer {path} has the same output on all {n} fitting images (up to "
                             "round-off): the images do not vary (copies of one image, or blank images), so no "
                             "pattern is defined; fit on varied images, e.g. a few hundred training images")
        if const.any():
            warnings.warn(f"{int(const.sum())} of {const.size} units of layer {path} have the same output on all {n} "
                          "fitting images (up to round-off): their patterns are undefined and set to 0; fit on "
                          "more varied images", RuntimeWarning, stacklevel=2)
            keep = jnp.asarray(~const)
            pats = {e: (v if e == "w" else jnp.where(keep[None, :], v, 0)) for e, v in pats.items()}
        out[path] = {e: _unflat_kernel(kinds[path], v, k.shape).astype(pdtype) for e, v in pats.items()}
    return out


def constant_units(stats: LayerStats, w, eps: float) -> jax.Array:
    """``[u]`` True where a unit's output ``y = w . x`` does not vary over the fitting data beyond round-off:
    its variance ``w . cov(x, y)`` at most ``100 eps scale`` with ``scale = E[y]^2 + (|E x| . |w|)^2`` (then every
    pattern of the unit is round-off divided by round-off). ``eps``: the variance's own round-off relative to
    ``scale``, ``eps_params^2`` (outputs rounded to the params' dtype) plus ``eps_accumulate`` (the sums'
    cancellation)."""
    n = stats.n
    ex, ey = stats.sx / n, stats.sy / n
    cov = stats.sxy / n - ex[:, None] * ey[None, :]
    var = jnp.sum(w * cov, axis=0)
    scale = ey ** 2 + (jnp.abs(ex) @ jnp.abs(w)) ** 2
    return var <= 100 * eps * scale


def _lookup(tree, path):
    for key in path.split("/"):
        tree = tree[key] if key in tree else tree[int(key)]  # an NNX list's entries are keyed by int
    return tree


# ---------------------------------------------------------------------------------------------- the explainers
def _backward_with(model, params, replaced: dict, x, target, output):
    """``d output / d x`` where each kernel layer's backward pass uses ``replaced[path]`` instead of its kernel
    (forward values, ReLU gates and max-pool routing unchanged), seeded with the output's value."""

    def hook(layer, xin, out):  # the same layer with the replacement kernel and no bias: linear in the input
        z = L.linear(layer, replaced[layer.path], xin)
        # value exactly ``out`` (z - z is exactly 0: max-pool ties and ReLU gates see the forward values)
        return jax.lax.stop_gradient(out) + (z - jax.lax.stop_gradient(z))

    def f(z):
        logits = L.run_with_hook(model, params, z[None], hook)[0]
        return select_output(logits, target, output)

    value, grad = jax.value_and_grad(f)(x)
    return grad * value


@explainer_dataclass(data_fields=("patterns",))
class PatternNet(Explainer):
    """PatternNet: the signal, back-projected with each kernel replaced by its pattern (estimator ``kind``).

    Attributes:
      patterns: :func:`fit_patterns`'s result (array data of the pytree).
      kind: the estimator, one of :data:`ESTIMATORS` (default ``"relu"``, the paper's S_a+-).
    """

    patterns: Any = None
    kind: str = "relu"
    # a static field that differs between the two classes: JAX compares the treedefs of a registered dataclass
    # and its registered subclass as EQUAL when their static fields agree, so jit would reuse one's compiled
    # function for the other (seen: PatternNet answered with PatternAttribution's trace)
    method: str = "patternnet"
    name = "patternnet"

    def __post_init__(self):
        if self.method != self.name:
            raise ValueError(f"method is set by the class ({self.name!r}); do not pass it")
        if self.kind not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.kind!r}; choose one of: {', '.join(ESTIMATORS)}")

    def _replaced(self, model, params):
        return {k: v[self.kind] for k, v in self.patterns.items()}

    def __call__(self, model, params, x, target, baseline=None, output="logit"):
        _check_supported(model, params)
        return _backward_with(model, params, self._replaced(model, params), x, target, output)


@explainer_dataclass(data_fields=("patterns",))
class PatternAttribution(PatternNet):
    """PatternAttribution: the backward pass with each kernel replaced by ``kernel * pattern``."""

    method: str = "patternattribution"
    name = "patternattribution"

    def _replaced(self, model, params):
        kernels = model.kernels(params)
        return {k: kernels[k] * v[self.kind] for k, v in self.patterns.items()}


def signal_quality(x_fit, x_eval, w, a) -> float:
    """The paper's criterion ``rho(S) = 1 - max_v corr(w^T x, v^T (x - S(x)))`` of ``S(x) = a (w^T x)`` for one
    unit: ``v`` by least squares on ``x_fit [n, d]``, the correlation measured on ``x_eval [m, d]`` (held out).
    1 is a perfect estimator (no signal left in the distractor ``x - S(x)``); 0 a useless one.

    (The identity estimator ``S_x`` leaves ``x - S(x) = 0``: its correlation is undefined, so it has no rho.)
    """
    x_fit, x_eval, w, a = (np.asarray(v, np.float64) for v in (x_fit, x_eval, w, a))

    def parts(x):
        y = x @ w
        d = x - np.outer(y, a)
        return y - y.mean(), d - d.mean(0)

    y, d = parts(x_fit)
    v, *_ = np.linalg.lstsq(d, y, rcond=None)
    y, d = parts(x_eval)
    r = d @ v
    den = np.linalg.norm(y) * np.linalg.norm(r)
    return float(1.0 - (abs(y @ r) / den if den > 0 else 0.0))


def layer_samples(model, params, images, path: str, max_rows: int | None = None, seed: int = 0):
    """``(x [n, d], w [d, u], b [u])``: the inputs one output unit of layer ``path`` sees (Dense: the layer's
    inputs; Conv: image patches, every output position a row) for ``images``, the layer's flat kernel and bias;
    at most ``max_rows`` rows, drawn at random (numpy float64)."""
    _check_supported(model, params)
    seen = jax.jit(lambda p, z: _capture(model, p, z)[0][path][1])(params, images)
    layer = _layers(model, params, images)[path]
    kernel = _lookup(params["params"], path)["kernel"]
    x = L.patches(layer, seen) if layer.kind == "conv" else seen.reshape(seen.shape[0], -1)
    x = np.asarray(x, np.float64)
    if max_rows is not None and x.shape[0] > max_rows:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)]
    entry = _lookup(params["params"], path)
    bias = np.asarray(entry["bias"], np.float64) if "bias" in entry else np.zeros(kernel.shape[-1])
    return x, np.asarray(_flat_kernel(layer.kind, kernel), np.float64), bias


def layer_signal_quality(x_fit, x_eval, w, a, a_neg=None, bias=None, ridge: float = 1e-9) -> np.ndarray:
    """rho of every unit of a layer at once (``w``, ``a`` ``[d, u]``; returns ``[u]``), for the estimator
    ``S(x) = a y`` or, with ``a_neg``, the two-component ``S(x) = a [y]_+ + a_neg [y]_-`` (regimes split where
    the unit's ReLU input ``y + bias`` is positive).

    ``v`` is the least squares of ``y`` on the distractor ``x - S(x)`` over ``x_fit``, through covariances:
    ``cov[d] = C + U M U^T`` with ``C = cov x`` and ``U = [a, a_neg, cov(x, p), cov(x, q)]`` (``p``, ``q`` the
    two regimes of ``y``), one Cholesky factorisation of ``C`` (+ ``ridge`` times its mean diagonal, for
    constant pixels) and a rank-four update per unit; the correlation is measured on ``x_eval`` (held out).
    Equals :func:`signal_quality` unit by unit (tested).
    """
    x_fit, x_eval, w, a = (np.asarray(v, np.float64) for v in (x_fit, x_eval, w, a))
    a_neg = a if a_neg is None else np.asarray(a_neg, np.float64)
    bias = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
    xc = x_fit - x_fit.mean(0)
    C = xc.T @ xc / len(xc)
    C += ridge * max(np.trace(C) / len(C), 1e-300) * np.eye(len(C))
    factor = scipy.linalg.cho_factor(C)

    def solve(b):
        return scipy.linalg.cho_solve(factor, b)

    def regimes(x):
        y = x @ w
        m = (y + bias) > 0
        return y, np.where(m, y, 0.0), np.where(m, 0.0, y)

    y, p, q = regimes(x_fit)
    pc, qc, yc = p - p.mean(0), q - q.mean(0), y - y.mean(0)
    cxp, cxq = xc.T @ pc / len(xc), xc.T @ qc / len(xc)
    ye, pe, qe = regimes(x_eval)
    xe = x_eval - x_eval.mean(0)
    ye, pe, qe = ye - ye.mean(0), pe - pe.mean(0), qe - qe.mean(0)
    out = np.empty(w.shape[1])
    for j in range(w.shape[1]):
        ap, an = a[:, j], a_neg[:, j]
        spp, sqq, spq = pc[:, j] @ pc[:, j] / len(xc), qc[:, j] @ qc[:, j] / len(xc), pc[:, j] @ qc[:, j] / len(xc)
        spy, sqy = pc[:, j] @ yc[:, j] / len(xc), qc[:, j] @ yc[:, j] / len(xc)
        rhs = cxp[:, j] + cxq[:, j] - ap * spy - an * sqy  # cov[d, y]
        U = np.stack([ap, an, cxp[:, j], cxq[:, j]], axis=1)
        M = np.array([[spp, spq, -1, 0], [spq, sqq, 0, -1], [-1, 0, 0, 0], [0, -1, 0, 0]], np.float64)
        Ci_rhs, Ci_U = solve(rhs), solve(U)
        v = Ci_rhs - Ci_U @ np.linalg.solve(np.eye(4) + M @ U.T @ Ci_U, M @ (U.T @ Ci_rhs))
        r = xe @ v - pe[:, j] * (ap @ v) - qe[:, j] * (an @ v)
        den = np.linalg.norm(ye[:, j]) * np.linalg.norm(r)
        out[j] = 1.0 - (abs(ye[:, j] @ r) / den if den > 0 else 0.0)
    return out


def kernel_from_pattern(pattern, cov, rcond: float = 1e-10) -> np.ndarray:
    """The kernel a LINEAR pattern was fitted for, from the pattern and the layer inputs' covariance.

    The estimator S_a gives ``a = C w / (w^T C w)`` per unit (``C = cov x``), so ``C^+ a / (a^T C^+ a) = P w``:
    the kernel projected on the data's support (``P`` the projector on C's range), exactly. Published linear
    patterns therefore give away the weights to anyone who knows (or estimates, from public data) ``C``.

    Args:
      pattern: flat ``[d, u]`` (:func:`flatten_kernel` of a ``"linear"`` pattern).
      cov: ``[d, d]`` covariance of the layer's inputs (a Conv layer: of its patches).
      rcond: relative cut-off of C's small eigenvalues (its pseudo-inverse).
    Returns: ``[d, u]`` float64.
    """
    a = np.asarray(pattern, np.float64)
    cov = np.asarray(cov, np.float64)
    if a.ndim != 2 or cov.shape != (a.shape[0], a.shape[0]):
        raise ValueError(f"pattern must be flat [d, u] and cov [d, d]; got {a.shape} and {cov.shape} "
                         "(flatten a conv pattern with flatten_kernel)")
    ca = np.linalg.pinv(cov, rcond=rcond, hermitian=True) @ a
    scale = np.sum(a * ca, axis=0)
    return np.where(scale != 0, ca / np.where(scale != 0, scale, 1.0), 0.0)

