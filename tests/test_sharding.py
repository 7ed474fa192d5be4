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
    from jaxrecover import attribution as A, models
    from jaxrecover.experiments import ProtocolConfig, run_protocol
    f = models.make_logit_fn("lenet")
    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 28, 28, 1), jnp.float64)
    t = jnp.arange(7) % 10
    one = A.attribute(f, v, x, t, steps=6, chunk_size=3, shard=False)
    two = A.attribute(f, v, x, t, steps=6, chunk_size=3, shard=True)
    assert two.shape == one.shape and two.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=1e-12, atol=1e-14)
    cfg = ProtocolConfig(steps=6)
    r1, _ = run_protocol(f, v, np.asarray(x), np.asarray(t), cfg, chunk_size=3, progress=False, shard=False)
    r2, _ = run_protocol(f, v, np.asarray(x), np.asarray(t), cfg, chunk_size=3, progress=False, shard=True)
    for k in r1:
        np.testing.assert_allclose(r2[k], r1[k], rtol=1e-9, atol=1e-14)
    # the chunk really was split across both devices
    chunk = jax.device_put(x[:4], A.data_parallel()[0])
    assert len(chunk.sharding.device_set) == 2
    print("SHARDING-OK")
""")


def test_two_devices_give_the_one_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SHARDING-OK" in r.stdout
