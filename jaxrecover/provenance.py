"""Where a number came from: the machine, the commit, and a checkpoint's training config in one line.

Every generated table names these (``jaxrecover.studies`` writes them under each docs block), so a reader can
tell which weights made which row and a rerun elsewhere can say when its weights differ from the doc's.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess

import jax

__all__ = ["machine_info", "machine_line", "git_commit", "config_line"]


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes to the code), or None outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # "-dirty" is about the code: run outputs (results/) and the docs they fill do not change a number
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!results", ":!docs", ":!README.md"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    """Platform, processor, core count, JAX backend and version, and the commit."""
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(), "device": str(dev.device_kind),
            "jax_version": jax.__version__, "git_commit": git_commit()}


def machine_line(info: dict | None = None) -> str:
    """``machine_info`` as one short line (for the foot of a table)."""
    m = machine_info() if info is None else info
    return (f"{m['processor']}, {m['cpu_count']} cores, {m['platform']}, JAX {m['jax_version']} "
            f"({m['jax_backend']}: {m['device']})")


def config_line(config) -> str:
    """The fields of a dataclass config that differ from their defaults, ``k=v`` (always the first field)."""
    fields = dataclasses.fields(config)
    parts = []
    for i, f in enumerate(fields):
        v = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if i == 0 or v != default:
            parts.append(f"{f.name}={v}")
    return " ".join(parts)
