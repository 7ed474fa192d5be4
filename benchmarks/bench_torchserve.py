"""Explanations per second from TorchServe over HTTP, with and without the client's concurrency.

Builds ``.mar`` archives of the PyTorch twins (VisionHandler's IG call: gausslegendre, 15 fixed steps,
float32) of the given models (a checkpoint folder per model, or random weights with ``--random``), starts one
TorchServe 0.12 on 127.0.0.1 per batching setting (``batch_size`` 1, and ``--batch`` with
``max_batch_delay`` ``--delay`` ms), and times ``RemoteIGService`` explaining ``--n`` MNIST test images
(one target, so every request may batch) at each client concurrency. Rounds are interleaved (every
concurrency once per round, in turn), the table shows the median over rounds with min-max, and the server's
requests counted by the client.

Usage: python benchmarks/bench_torchserve.py [--models twolayer lenet] [--checkpoints checkpoints]
       [--concurrency 1 4 8] [--n 64] [--rounds 5] [--batch 8] [--delay 5] [--smoke]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _variables(name, checkpoints, random):
    import jax
    import jax.numpy as jnp

    from jaxrecover.models import init_variables
    from jaxrecover.training import load_trained

    if random:
        return init_variables(name, jax.random.key(0), jnp.float32), "random init (seed 0)"
    folder = Path(checkpoints) / name
    _, v, meta = load_trained(str(folder))
    return v, f"{folder} (state {meta['state_sha256'][:16]})"


def main(argv=None):
    from jaxrecover.audit import default_inputs
    from jaxrecover.services.remote import RemoteIGService
    from jaxrecover.services.torchserve import TorchServe, build_archive

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["twolayer", "lenet"], help="(default: %(default)s)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder of checkpoints (default: %(default)s)")
    p.add_argument("--random", action="store_true", help="random weights instead of checkpoints")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="(default: %(default)s)")
    p.add_argument("--n", type=int, default=64, help="explanations per timing (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="TorchServe batch_size of the batching server "
                   "(default: %(default)s)")
    p.add_argument("--delay", type=int, default=5, help="its max_batch_delay in ms (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="a few seconds' check: twolayer, n 4, 1 round")
    a = p.parse_args(argv)
    if a.smoke:
        a.models, a.n, a.rounds, a.concurrency = ["twolayer"], 4, 1, [1, 2]
    x = default_inputs(a.n)
    target = np.full(a.n, 3)
    print(f"TorchServe 0.12, VisionHandler IG (gausslegendre, 15 fixed steps, float32), {a.n} explanations per "
          f"timing, median of {a.rounds} interleaved rounds [min-max]\n")
    print("| model | weights | TorchServe batching | client concurrency | explanations / s | requests |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-torchserve-") as tmp:
        store = Path(tmp) / "store"
        weights = {}
        for name in a.models:
            v, weights[name] = _variables(name, a.checkpoints, a.random)
            build_archive(name, v, store)
        for batch, delay in ((1, 0), (a.batch, a.delay)):
            with TorchServe(store, a.models, Path(tmp) / f"ts-b{batch}", batch_size=batch,
                            max_batch_delay=delay) as ts:
                for name in a.models:
                    times = {c: [] for c in a.concurrency}
                    requests = {}
                    for c in a.concurrency:  # warm-up: one pass each
                        with RemoteIGService(ts.url, name, protocol="torchserve", concurrency=c) as r:
                            r(x[:c], target[:c])
                    for _ in range(a.rounds):
                        for c in a.concurrency:
                            with RemoteIGService(ts.url, name, protocol="torchserve", concurrency=c) as r:
                                t0 = time.perf_counter()
                                r(x, target)
                                times[c].append(time.perf_counter() - t0)
                                requests[c] = r.stats.requests
                    for c in a.concurrency:
                        rate = a.n / np.asarray(times[c])
                        print(f"| {name} | {weights[name]} | batch_size {batch}, delay {delay} ms | {c} | "
                              f"{np.median(rate):.1f} [{rate.min():.1f}-{rate.max():.1f}] | {requests[c]} |",
                              flush=True)


if __name__ == "__main__":
    main()
