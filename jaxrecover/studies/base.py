"""The Study interface: a config (dataclass), the checkpoints it declares, resumable units, rows, markdown.

A study is data plus a pure run. It says

* ``Config``: a dataclass whose fields (with their defaults and ``help``) become the CLI options of
  ``jaxrecover study NAME``;
* ``checkpoints(cfg)``: the weights it needs, as ``{label: TrainConfig}``; the runner trains any that is
  missing, with exactly that config, and names each (config, state SHA-256) under the table;
* ``units(cfg)``: the resumable pieces of work, each a :class:`Unit` (its settings, the checkpoint labels and
  datasets it reads); a finished unit is reused when its settings, weights and inputs are unchanged;
* ``run(unit, ctx)``: the rows of one unit (a list of JSON-able dicts), computed from ``ctx`` only;
* ``markdown(rows, cfg)``: the table(s), written into ``doc`` between ``<!-- block:begin/end -->``.

Everything else (resume, atomic ``rows.json``, provenance, docs, progress) is the runner's
(:func:`jaxrecover.studies.run_study`), the same for every study.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from ..training import TrainConfig

__all__ = ["Study", "Unit", "Context", "option"]


def option(default, help: str):  # noqa: A002 - the argparse word
    """A config field with its ``--help`` text (tuples: give them as comma-separated lists on the CLI)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("study options must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Unit:
    """One resumable piece of a study.

    ``settings``: JSON-able, everything that decides the unit's rows besides the weights and the data
    (the runner's resume key hashes it with the state SHA-256 of each of ``checkpoints`` and the data SHA-256 of
    each of ``datasets``); ``label``: a short name for progress bars.
    """

    settings: dict
    checkpoints: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ("mnist",)
    label: str = ""


class Context:
    """What ``Study.run`` may read: the declared checkpoints (loaded once), datasets (loaded once), the output
    folder (figures, side files), the config, and whether to show progress."""

    def __init__(self, cfg, out: Path, loaded: dict[str, tuple], progress: bool = True,
                 folders: dict[str, Path] | None = None):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self._loaded = loaded  # label -> (model name, float32 variables, metadata)
        self._folders = dict(folders or {})  # label -> checkpoint folder
        self._datasets: dict[str, Any] = {}

    def checkpoint_folder(self, label: str) -> Path:
        """The folder of the declared checkpoint ``label`` (for studies that hand it to a server process)."""
        if label not in self._folders:
            raise KeyError(f"checkpoint {label!r} is not declared by this study's checkpoints()")
        return Path(self._folders[label])

    def checkpoint(self, label: str) -> tuple[Any, Any, dict]:
        """``(module, float32 variables, metadata)`` of the declared checkpoint ``label``."""
        from ..models import make_model

        if label not in self._loaded:
            raise KeyError(f"checkpoint {label!r} is not declared by this study's checkpoints()")
        name, variables, meta = self._loaded[label]
        return make_model(name), variables, meta

    def test_inputs(self, label: str, n: int, dtype, *, first: int = 0, dataset: str = "mnist"):
        """``(module, variables in dtype, x[n] normalised in dtype, labels[n])``: checkpoint ``label`` and the
        test images ``first .. first + n - 1``, the common start of a study's unit."""
        import jax.numpy as jnp
        import numpy as np

        from ..data import normalize
        from ..models import cast_variables

        model, v32, _ = self.checkpoint(label)
        ds = self.dataset(dataset)
        dtype = np.dtype(dtype)
        x = jnp.asarray(normalize(ds.test_images[first:first + n], dtype=dtype))
        return model, cast_variables(v32, dtype), x, jnp.asarray(ds.test_labels[first:first + n])

    def dataset(self, name: str = "mnist"):
        from ..data import load_dataset

        if name not in self._datasets:
            self._datasets[name] = load_dataset(name)
        return self._datasets[name]


class Study:
    """Base class of every study (see the module docstring). Subclasses set the class attributes and the
    methods below; instances are stateless."""

    name: ClassVar[str]
    title: ClassVar[str]
    Config: ClassVar[type]
    doc: ClassVar[str | None] = None  # docs file (relative to the repository root) holding the block
    block: ClassVar[str | None] = None  # the marker name: <!-- block:begin --> ... <!-- block:end -->
    version: ClassVar[int] = 1  # bump when the rows change meaning: stored rows are then recomputed
    out: ClassVar[str | None] = None  # default output folder (results/<name>)

    def checkpoints(self, cfg) -> dict[str, TrainConfig]:
        return {}

    def units(self, cfg) -> list[Unit]:
        raise NotImplementedError

    def run(self, unit: Unit, ctx: Context) -> list[dict]:
        raise NotImplementedError

    def markdown(self, rows: list[dict], cfg) -> str:
        raise NotImplementedError

    def quick(self, cfg):
        """The ``--quick`` config: small enough for a smoke run in about a minute (default: unchanged)."""
        return cfg

    def finish(self, rows: list[dict], cfg, ctx: Context) -> None:
        """After every unit: figures and side files from all rows (default: nothing)."""

    # ------------------------------------------------------------------ config <-> CLI

    def make_config(self, **overrides):
        try:
            return self.Config(**overrides)
        except TypeError as e:
            raise ValueError(f"study {self.name}: {e}") from None

    def default_out(self) -> str:
        return self.out or f"results/{self.name}"
