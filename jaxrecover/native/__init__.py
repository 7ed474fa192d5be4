"""jaxrecover's one compiled kernel pair: the sparse ReLU -> convolution path (XLA FFI, CPU), built on first use.

The C++ source (``relu_conv_path.cc``, next to this file) is compiled with the
system's C++ compiler against jaxlib's FFI headers the first time it is needed
and cached under ``$JAXRECOVER_CACHE`` (default ``~/.cache/jaxrecover``), keyed
by the source, jaxlib's version, the compiler command and this CPU's
instruction-set flags (it is built with ``-march=native``), written to a
temporary file and renamed, so no half-written library is ever loaded. Its
SHA-256 is stored beside it (``.so.sha256``) and checked before every load: a
library damaged in the cache afterwards (truncated by a full disk, a copy cut
short) would crash the process with a bus error when loaded, so it is rebuilt
instead, with a warning.

Where it cannot be built (no compiler, a non-CPU backend) :func:`available`
is False and callers take the dense JAX path, which computes the same values;
``JAXRECOVER_NATIVE=0`` turns it off on purpose. :func:`status` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax

__all__ = ["available", "status", "library_path", "ENV_SWITCH", "CACHE_ENV"]

#: Set to "0" to never build or use the native kernels (the dense JAX path runs instead).
ENV_SWITCH = "JAXRECOVER_NATIVE"
#: Folder of compiled kernels (default ``~/.cache/jaxrecover``).
CACHE_ENV = "JAXRECOVER_CACHE"
SOURCE = Path(__file__).with_name("relu_conv_path.cc")
TARGETS = {"jr_relu_conv_path_fwd": "JrReluConvPathFwd", "jr_relu_conv_path_bwd": "JrReluConvPathBwd"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def library_path(compiler: str) -> Path:
    """Where the library built by ``compiler`` for this source, jaxlib and CPU lives (it may not exist yet)."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode(),
                 _cpu_flags().encode(), sys.platform.encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxrecover").expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{CACHE_ENV}={root} is a file, not a folder; point it at a folder or unset it")
    return root / "native" / f"relu_conv_path-{key.hexdigest()[:16]}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool | None:
    """Whether ``target`` is the library that was built (its stored SHA-256 matches); None: no hash stored
    (built by jaxrecover < 0.3)."""
    sidecar = target.with_name(target.name + ".sha256")
    try:
        want = sidecar.read_text().strip()
    except OSError:
        return None
    try:
        return want == _digest(target)
    except OSError:
        return False


def _build(compiler: str) -> Path:
    """The cached library for ``compiler``, built first when missing or damaged. Concurrent processes (e.g. test
    workers) build one at a time under the cache folder's lock; the others then find it intact."""
    from ..fileio import folder_lock

    target = library_path(compiler)
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target.parent, "native-build"):
        return _build_locked(compiler, target)


def _build_locked(compiler: str, target: Path) -> Path:
    if target.exists():
        intact = _intact(target)
        if intact:
            return target
        if intact is False:
            warnings.warn(f"jaxrecover: the cached native library {target} is damaged (its SHA-256 does not match "
                          "the one recorded when it was built); rebuilding it", RuntimeWarning, stacklevel=4)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
        side_fd, side_tmp = tempfile.mkstemp(suffix=".sha256", dir=target.parent)
        with os.fdopen(side_fd, "w") as f:
            f.write(_digest(Path(tmp)) + "\n")
        os.replace(side_tmp, target.with_name(target.name + ".sha256"))  # the hash first, then the library
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> tuple[bool, str]:
    if os.environ.get(ENV_SWITCH, "") == "0":
        return False, f"{ENV_SWITCH}=0"
    if jax.default_backend() != "cpu":
        return False, f"backend {jax.default_backend()!r} (the kernels are CPU code)"
    compiler = _compiler()
    if compiler is None:
        return False, "no C++ compiler found (set CXX, or install g++)"
    try:
        path = _build(compiler)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as err:  # noqa: BLE001 - any failure means: use the dense path, and say why once
        warnings.warn(f"jaxrecover: the native sparse-path kernels could not be built ({type(err).__name__}: "
                      f"{str(err)[:300]}); using the dense JAX path (same values, slower on CPU). "
                      f"Set {ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=3)
        return False, f"build failed: {type(err).__name__}: {str(err)[:300]}"
    return True, f"built: {path}"


@functools.cache
def _loaded() -> tuple[bool, str]:
    with _lock:
        return _load()


def available() -> bool:
    """Whether the native kernels can run here (builds them on the first call; False: use the dense path)."""
    if os.environ.get(ENV_SWITCH, "") == "0":
        return False
    return _loaded()[0]


def status() -> str:
    """One line: whether the native kernels are in use, and why not when they are not."""
    ok, why = (False, f"{ENV_SWITCH}=0") if os.environ.get(ENV_SWITCH, "") == "0" else _loaded()
    return ("native sparse path: on (" if ok else "native sparse path: off (") + why + ")"
