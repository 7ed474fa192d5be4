"""Data parallelism over devices: results identical to one device.

The CPU is split into two XLA devices in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=2), which must be set before
JAX starts, so the check runs as a script.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 2, jax.devices()
    from jaxrecover import models
    from jaxrecover.engine import data_parallel, explain
    from jaxrecover.explainers import IG
    from jaxrecover.protocol import ProtocolConfig, run_protocol
    f = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 28, 28, 1), jnp.float64)
    t = jnp.arange(7) % 10
    one = explain(IG(steps=6), f, v, x, t, chunk_size=3, shard=False)
    two = explain(IG(steps=6), f, v, x, t, chunk_size=3, shard=True)
    assert two.shape == one.shape and two.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=1e-12, atol=1e-14)
    cfg = ProtocolConfig(steps=6)
    r1, _ = run_protocol(f, v, np.asarray(x), np.asarray(t), cfg, chunk_size=3, progress=False, shard=False)
    r2, _ = run_protocol(f, v, np.asarray(x), np.asarray(t), cfg, chunk_size=3, progress=False, shard=True)
    for k in r1:
        np.testing.assert_allclose(r2[k], r1[k], rtol=1e-9, atol=1e-14)
    # the chunk really was split across both devices
    chunk = jax.device_put(x[:4], data_parallel()[0])
    assert len(chunk.sharding.device_set) == 2
    print("SHARDING-OK")
""")


def test_two_devices_give_the_one_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SHARDING-OK" in r.stdout


WORKER = textwrap.dedent("""
    import sys
    import jax
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from jaxrecover import models
    from jaxrecover.engine import data_parallel, explain
    from jaxrecover.explainers import IG
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    f = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)   # the same weights in both processes
    x = jax.random.normal(jax.random.key(1), (9, 28, 28, 1), jnp.float64)
    t = jnp.arange(9) % 10
    mine = slice(0, 5) if pid == 0 else slice(5, 9)   # unequal shares: 5 and 4 examples
    ig = explain(IG(steps=6), f, v, x[mine], t[mine], chunk_size=2)
    assert ig.shape == (mine.stop - mine.start, 28, 28, 1) and ig.dtype == jnp.float64
    np.save(out, np.asarray(ig))
    print("MULTIHOST-OK", pid)
""")


def _run_two_processes(script: str, ok: str, out_arg) -> None:
    """Run ``script`` as processes 0 and 1 of a JAX run (2 CPU devices each, a free local port); both must print ``ok``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), port, out_arg(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert ok in out


def test_two_processes_use_all_devices_and_return_their_own_rows(tmp_path):
    """A multi-process JAX run (2 processes x 2 CPU devices, gloo collectives): each process gets the
    IG of its own examples, identical to one device computing all of them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrecover.engine import explain
    from jaxrecover.explainers import IG
    from jaxrecover import models

    _run_two_processes(WORKER, "MULTIHOST-OK", lambda i: str(tmp_path / f"ig{i}.npy"))
    f = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (9, 28, 28, 1), jnp.float64)
    ref = np.asarray(explain(IG(steps=6), f, v, x, jnp.arange(9) % 10, chunk_size=2, shard=False))
    got = np.concatenate([np.load(tmp_path / "ig0.npy"), np.load(tmp_path / "ig1.npy")])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


PROTOCOL_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import jax
    pid, port, tmp = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from jaxrecover import models
    from jaxrecover.protocol import ProtocolConfig, run_protocol
    f = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (9, 28, 28, 1), jnp.float64))
    y = np.arange(9) % 10
    res, seconds = run_protocol(f, v, x, y, ProtocolConfig(steps=4), chunk_size=2, progress=False,
                                partial_path=tmp / "run.partial.npz")
    assert Path(f"{tmp / 'run.partial.npz'}.p{pid}of2").exists()   # each process resumes from its own share
    assert seconds > 0
    np.savez(tmp / f"res{pid}.npz", **res)
    print("PROTOCOL-MULTIHOST-OK", pid)
""")


def test_protocol_in_two_processes_gathers_every_share(tmp_path):
    """run_protocol in a 2-process run: each process computes its share (5 and 4 images), and both return
    all 9 distances, equal to one process computing them all."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrecover import models
    from jaxrecover.protocol import ProtocolConfig, run_protocol

    _run_two_processes(PROTOCOL_WORKER, "PROTOCOL-MULTIHOST-OK", lambda i: str(tmp_path))
    f = models.make_model("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (9, 28, 28, 1), jnp.float64))
    ref, _ = run_protocol(f, v, x, np.arange(9) % 10, ProtocolConfig(steps=4), chunk_size=2, progress=False,
                          shard=False)
    for pid in (0, 1):
        with np.load(tmp_path / f"res{pid}.npz") as got:
            assert set(got.files) == set(ref)
            for k in ref:
                assert got[k].shape == (9,) and got[k].dtype == np.float64
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-12)
