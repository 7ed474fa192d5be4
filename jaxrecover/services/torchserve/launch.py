"""Build a ``.mar`` of a model's PyTorch twin and run TorchServe on loopback (see the package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..process import free_port, stop_group

__all__ = ["build_archive", "TorchServe", "free_port"]

HANDLER = Path(__file__).with_name("handler.py")


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install 'jaxrecover[endpoints]' (or bash scripts/setup.sh "
                                "endpoints)")
    return found


def build_archive(model: str, variables, export_dir, *, name: str | None = None, topk: int | None = None) -> Path:
    """A TorchServe archive ``export_dir/NAME.mar`` of ``model``'s float32 PyTorch twin (TorchScript) with the
    VisionHandler IG call; ``/predictions`` answers raw logits (``topk=None``), the top-``topk`` probabilities, or
    the predicted label only (``topk=0``)."""
    import torch

    from ..external import torch_twins

    name = name or model
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    work = export_dir / f".{name}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    twin = torch_twins.torch_twin(model, variables, torch.float32).eval()
    shape = (1, 28, 28)  # every model of this library takes an MNIST image (NCHW in torch)
    example = torch.zeros((1, *shape), dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(twin, example)
        if not torch.equal(traced(example + 0.5), twin(example + 0.5)):
            raise RuntimeError(f"the TorchScript trace of the {model} twin does not match the twin")
    traced.save(str(work / "model.pt"))
    (work / "serving.json").write_text(json.dumps({"topk": topk, "input_shape": list(shape)}))
    cmd = [_tool("torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--serialized-file", str(work / "model.pt"), "--handler", str(HANDLER),
           "--extra-files", str(work / "serving.json"), "--export-path", str(export_dir), "--force"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    shutil.rmtree(work, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    return export_dir / f"{name}.mar"


class TorchServe:
    """A TorchServe process on 127.0.0.1 serving the archives in ``model_store`` (a context manager).

    Args:
      model_store: the folder of ``.mar`` files; models: the archive names (``"twolayer"`` for twolayer.mar).
      workdir: where its config, logs and snapshots go (kept after :meth:`stop`: read ``log`` when a test fails).
      batch_size, max_batch_delay: TorchServe's batching (requests arriving within ``max_batch_delay`` ms are
        explained together, with the first one's target).
      startup_timeout: seconds to wait for every model's worker to be ready.
    """

    def __init__(self, model_store, models, workdir, *, batch_size: int = 1, max_batch_delay: int = 50,
                 startup_timeout: float = 180.0):
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        self.workdir = Path(workdir).resolve()  # TorchServe runs in it: relative paths would break
        self.batch_size = int(batch_size)
        self.max_batch_delay = int(max_batch_delay)
        self.startup_timeout = float(startup_timeout)
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "torchserve.log"
        self.port = self.management_port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TorchServe:
        if shutil.which("java") is None:
            raise FileNotFoundError("TorchServe needs a Java 17 runtime: apt-get install openjdk-17-jre-headless")
        for m in self.models:
            if not (self.model_store / f"{m}.mar").exists():
                raise FileNotFoundError(f"no archive {m}.mar in {self.model_store}; build it with build_archive")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.management_port, metrics = free_port(), free_port(), free_port()
        grpc_inference, grpc_management = free_port(), free_port()  # defaults 7070/7071 collide between servers
        models = {m: {"1.0": {"defaultVersion": True, "marName": f"{m}.mar", "minWorkers": 1, "maxWorkers": 1,
                              "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay,
                              "responseTimeout": 120}} for m in self.models}
        cfg = self.workdir / "config.properties"
        cfg.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.port}",
            f"management_address=http://127.0.0.1:{self.management_port}",
            f"metrics_address=http://127.0.0.1:{metrics}",
            f"grpc_inference_port={grpc_inference}", f"grpc_management_port={grpc_management}",
            f"model_store={self.model_store}", "load_models=" + ",".join(f"{m}.mar" for m in self.models),
            f"models={json.dumps(models)}", "disable_token_authorization=true", "install_py_dep_per_model=false",
            "default_workers_per_model=1", "enable_envvars_config=false", "disable_system_metrics=true", ""]))
        # the launcher keeps ONE pid file in the temp folder (ts/model_server.py) and exits 1 when another
        # TorchServe runs: a temp folder of its own lets servers run side by side (tests, studies)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   TMPDIR=str(tmp),
                   LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"),
                   TS_CONFIG_FILE=str(cfg), OMP_NUM_THREADS="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [_tool("torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
                 "--ts-config", str(cfg), "--model-store", str(self.model_store)],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:  # bounded: one poll every 0.5 s until the deadline
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode} while starting: "
                                   f"{self._log_tail()!r}; log: {self.log}")
            try:
                ready = all(
                    any(w.get("status") == "READY" for w in httpx.get(
                        f"http://127.0.0.1:{self.management_port}/models/{m}", timeout=2).json()[0]["workers"])
                    for m in self.models)
                if ready:
                    return
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe's models were not ready within {self.startup_timeout:.0f} s: "
                           f"{self._log_tail()!r}; log: {self.log}")

    def _log_tail(self, n: int = 400) -> str:
        """The end of the server's log (what a CI log shows when the run's folder is gone)."""
        try:
            return self.log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the launcher, the Java frontend and its workers (their process group, by the launcher's pid)."""
        stop_group(self.proc, term_wait=20.0, kill_wait=10.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
