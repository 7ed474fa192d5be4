"""The attacker's answer to noisy answers: ask each query several times and average (a service wrapper)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..services import IGService, ServiceWrapper

__all__ = ["Averaged"]


class Averaged(ServiceWrapper):
    """The attacker's answer to noise: each query asked ``repeats`` times and the answers averaged.

    Counts as ``repeats`` queries on the service (its counters and budget see every one).
    """

    def __init__(self, inner: IGService, repeats: int):
        if not (isinstance(repeats, (int, np.integer)) and repeats >= 1):
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        super().__init__(inner)
        self.__dict__["repeats"] = int(repeats)

    def __call__(self, x, target, *, steps: int | None = None):
        x = jnp.asarray(x)
        total = sum(np.asarray(self.inner(x, target, steps=steps), np.float64) for _ in range(self.repeats))
        return jnp.asarray(total / self.repeats, x.dtype)
