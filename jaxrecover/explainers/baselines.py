"""Input-dependent IG baselines: the blurred input (Sturmfels, Lundberg, Lee, Distill 2020).

A baseline function maps a batch ``x[N, H, W, C]`` to baselines of the same
shape and dtype. :class:`BlurBaseline` is a linear operator ``B`` (Gaussian
blur, reflect padding, kernel normalised to sum 1, so constant images are
fixed points); services take it as ``baseline=BlurBaseline(sigma)`` and
attacks that need the operator use :meth:`BlurBaseline.apply`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BlurBaseline", "RandomBaseline", "is_input_dependent"]


def _kernel(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@functools.partial(jax.jit, static_argnames=("radius",))
def _blur(x, kernel, radius):
    """Separable blur of ``x[N, H, W, C]`` along H and W with reflect padding, in ``x``'s dtype."""
    k = kernel.astype(x.dtype)

    def along(a, axis):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (radius, radius)
        ap = jnp.pad(a, pad, mode="reflect")
        n = a.shape[axis]
        return sum(k[i] * jax.lax.slice_in_dim(ap, i, i + n, axis=axis) for i in range(2 * radius + 1))

    return along(along(x, 1), 2)


@dataclasses.dataclass(frozen=True)
class BlurBaseline:
    """The blurred input as baseline: ``b(x) = B x``, a Gaussian blur of width ``sigma`` pixels.

    Args:
      sigma: the Gaussian's standard deviation in pixels (> 0).
      radius: the kernel's half width (default ``ceil(3 sigma)``, at most 13 for 28-pixel images).
    """

    sigma: float = 5.0
    radius: int | None = None
    linear = True  # b(x) = B x: what recover_input_baseline needs

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"BlurBaseline needs sigma > 0 pixels, got {self.sigma!r}")
        if self.radius is None:
            object.__setattr__(self, "radius", int(min(np.ceil(3 * self.sigma), 13)))
        if self.radius < 1:
            raise ValueError(f"BlurBaseline needs radius >= 1, got {self.radius}")

    def __call__(self, x):
        """Baselines ``B x`` for a batch ``x[N, H, W, C]`` (same dtype)."""
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"BlurBaseline blurs image batches [N, H, W, C], got shape {tuple(x.shape)}")
        if min(x.shape[1:3]) <= self.radius:
            raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} pixels are too small for a blur radius of "
                             f"{self.radius}; pass a smaller radius")
        return _blur(x, jnp.asarray(_kernel(self.sigma, self.radius)), self.radius)

    def __str__(self) -> str:
        return f"blur(sigma={self.sigma:g})"


class RandomBaseline:
    """Baselines drawn at random from a reference set, fresh for every input (expected gradients' baselines).

    Args:
      references: ``[R, ...]`` reference inputs (e.g. training images), any float dtype.
      seed: the generator is seeded once; ``last`` holds the indices drawn by the latest call.
    """

    def __init__(self, references, seed: int = 0):
        self.references = np.asarray(references, np.float64)
        if self.references.ndim < 2 or self.references.shape[0] == 0:
            raise ValueError(f"RandomBaseline needs a non-empty batch of references [R, ...], "
                             f"got shape {self.references.shape}")
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self.last = None

    def __call__(self, x):
        x = jnp.asarray(x)
        if tuple(x.shape[1:]) != self.references.shape[1:]:
            raise ValueError(f"inputs of shape {tuple(x.shape[1:])} but references of shape "
                             f"{self.references.shape[1:]}")
        self.last = self._rng.integers(self.references.shape[0], size=x.shape[0])
        return jnp.asarray(self.references[self.last], x.dtype)

    def __str__(self) -> str:
        return f"random(R={self.references.shape[0]}, seed={self.seed})"


def is_input_dependent(baseline) -> bool:
    """Whether ``baseline`` is a function of the input (not a fixed array or None)."""
    return callable(baseline) and not isinstance(baseline, (np.ndarray, jax.Array))
