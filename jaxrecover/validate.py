"""Validation of the settings every entry point takes: counts, radii, seeds, class labels, a tree's float dtype.

One helper per kind of value, shared by the library (``TrainConfig``, ``boundary_search``, the engine's
targets) and the CLIs, so the same bad value gets the same one-line error wherever it is given. Each
raises ``ValueError`` (``TypeError`` for a wrong kind of label) naming the setting, the value and the range.
"""

from __future__ import annotations

import numpy as np

__all__ = ["positive_int", "radius", "seed", "class_labels", "float_dtype"]

#: Seeds are fed to numpy's and JAX's generators: non-negative and at most 2^32 - 1 (JAX's key takes a 32-bit
#: integer; numpy accepts larger ones, so a larger seed would mean different things to the two).
MAX_SEED = 2**32 - 1


def positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """A positive integer (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def radius(name: str, value, *, lo: float = 0.0, hi: float = 1.0, allow_lo: bool = False) -> float:
    """A finite number in ``(lo, hi]`` (``[lo, hi]`` with ``allow_lo``); radii are in pixel units of [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {'[' if allow_lo else '('}{lo:g}, {hi:g}], got {value!r}") from None
    if not np.isfinite(v) or v > hi or v < lo or (v == lo and not allow_lo):
        span = f"{'[' if allow_lo else '('}{lo:g}, {hi:g}]" if np.isfinite(hi) else f"{'>=' if allow_lo else '>'} {lo:g}"
        raise ValueError(f"{name} must be a finite number {'in ' if np.isfinite(hi) else ''}{span} "
                         f"(pixel units of images in [0, 1]), got {value!r}")
    return v


def seed(name: str, value) -> int:
    """A seed in ``[0, 2^32 - 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2^32 - 1], got {value!r}")
    return int(value)


def class_labels(labels, n: int, num_classes: int | None, what: str = "targets") -> np.ndarray:
    """``labels`` as an int32 ``[n]`` array (one int broadcast), each a class index in ``[0, num_classes)``.
    ``what``: the argument's name in the messages (plural, e.g. "targets": "target must have shape ...")."""
    t = np.asarray(labels)
    if t.ndim == 0:
        t = np.full((n,), t)
    if t.shape != (n,):
        raise ValueError(f"{what.removesuffix('s')} must have shape ({n},) (one class per example), got {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        if not np.issubdtype(t.dtype, np.floating) or not np.all(t == np.round(t)):
            odd = t[(t != np.round(t)) | ~np.isfinite(t)].flat[0] if np.issubdtype(t.dtype, np.floating) else t.flat[0]
            raise TypeError(f"{what} must be integer class indices, got {t.dtype} values such as {odd.item()!r}")
    if num_classes is not None and t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got values from {t.min()} to {t.max()}")
    return t.astype(np.int32)


def float_dtype(tree, what: str = "the parameters"):
    """The floating-point dtype of a pytree (e.g. a model's variables): THE one place it is found
    (``jaxrecover.models.float_dtype`` is this function).

    Raises:
      ValueError: the tree has no floating-point leaf, or mixes float dtypes (cast it with
        :func:`jaxrecover.models.cast_variables`).
    """
    import jax
    import jax.numpy as jnp

    found = {jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)}
    floats = {d for d in found if jnp.issubdtype(d, jnp.floating)}
    if not floats:
        raise ValueError(f"{what} have no floating-point leaves")
    if len(floats) > 1:
        raise ValueError(f"{what} mix float dtypes {sorted(d.name for d in floats)}; cast them with "
                         "jaxrecover.models.cast_variables")
    return jnp.dtype(floats.pop())
