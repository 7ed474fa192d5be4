"""Server processes on loopback: a free port, a process started in its own session, stopped by its own pid.

Shared by the TorchServe launcher, ``jaxrecover serve`` as a child process (:class:`ServeProcess`), the
``endpoints`` study and the endpoint tests. Written here because no library starts a server, waits for its
readiness route and stops exactly its process group (never by name) with a bounded wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["free_port", "group_alive", "stop_group", "ServerProcess", "ServeProcess"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process of process group ``pgid`` still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _members(pgid) > 0  # a zombie leader counts as gone; members still running keep the group alive


def _members(pgid: int) -> int:
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                n += 1
    return n


def stop_group(proc: subprocess.Popen | None, *, term_wait: float = 20.0, kill_wait: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session=True``), SIGKILL what is left
    after ``term_wait`` seconds; returns once the group is gone or ``kill_wait`` more seconds have passed."""
    if proc is None or proc.poll() is not None and not group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    proc.poll()


class ServerProcess:
    """``cmd`` as a server on loopback (a context manager): started in its own session with its output in
    ``log``, ready once ``ready_url`` answers HTTP 200 (polled every 0.3 s until ``startup_timeout``), stopped
    by its process group. A server that exits or does not become ready raises with the log's tail."""

    def __init__(self, cmd: list[str], log, ready_url: str, *, startup_timeout: float = 120.0, env=None, cwd=None):
        self.cmd, self.log, self.ready_url = list(cmd), Path(log), ready_url
        self.startup_timeout, self.env, self.cwd = float(startup_timeout), env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self):
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:  # bounded: one poll per 0.3 s
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        code = self.proc.poll()
        self.stop()
        what = f"exited with {code}" if code is not None else f"was not ready within {self.startup_timeout:.0f} s"
        raise RuntimeError(f"server {Path(self.cmd[0]).name} {' '.join(self.cmd[1:4])} ... {what}; log {self.log}:\n"
                           + self.log.read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        stop_group(self.proc, term_wait=15.0, kill_wait=10.0)

    @property
    def running(self) -> bool:
        return self.proc is not None and group_alive(self.proc.pid)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ServeProcess(ServerProcess):
    """``jaxrecover serve CHECKPOINT ARGS...`` as a child process on a free loopback port (a context manager);
    ``url`` is its base URL, ``name`` the model's name in it."""

    def __init__(self, checkpoint, args=(), *, name: str | None = None, log=None, startup_timeout: float = 120.0):
        from ..checkpoint import load_metadata

        self.port = free_port()
        self.name = name or load_metadata(checkpoint)["model"]
        cmd = [sys.executable, "-m", "jaxrecover", "serve", str(checkpoint), "--port", str(self.port),
               "--name", self.name, *map(str, args)]
        log = log or Path(checkpoint).parent / f".serve-{self.port}.log"
        super().__init__(cmd, log, f"http://127.0.0.1:{self.port}/v1/models/{self.name}",
                         startup_timeout=startup_timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
