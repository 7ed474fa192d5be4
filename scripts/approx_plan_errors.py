"""Error of the approximate plans (fixed step count) for every IG rule, on trained models.

For each rule, the service answers with a FIXED step count m (no exact plan exists
then, docs/RECOVERY.md). Measured: the paper's distance between the true VG and
* eq3: approx_plan(rule, m, a) - two queries at x and a*x (models with bias);
* nobias: nobias_plan(rule, m) - one query (no-bias models).

Usage: python scripts/approx_plan_errors.py [--n 100] [--steps 50] [--a 0.98] [--dtype float64]
Prints a Markdown table (docs/RECOVERY.md).
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrecover import attacks, data, metrics, models  # noqa: E402
from jaxrecover.engine import explain  # noqa: E402
from jaxrecover.explainers import RULES, VG  # noqa: E402
from jaxrecover.training import load_trained  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--a", type=float, default=0.98)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--models", nargs="+", default=["twolayer_nobias", "twolayer", "lenet_nobias", "lenet"])
    p.add_argument("--checkpoints", default="checkpoints")
    a = p.parse_args()
    ds = data.load_dataset("mnist")
    x = jnp.asarray(data.normalize(ds.test_images[: a.n], np.dtype(a.dtype)))
    y = jnp.asarray(ds.test_labels[: a.n])
    print(f"mean (max) distance to the true VG over the first {a.n} test images, m = {a.steps}, {a.dtype}\n")
    print("| rule | " + " | ".join(a.models) + " |")
    print("|---|" + "---|" * len(a.models))
    cols = {}
    for name in a.models:
        _, v, _ = load_trained(f"{a.checkpoints}/{name}")
        v = models.cast_variables(v, a.dtype)
        f = models.make_model(name)
        vg = explain(VG(), f, v, x, y)
        for rule in RULES:
            plan = (attacks.nobias_plan(rule, a.steps) if name.endswith("nobias")
                    else attacks.approx_plan(rule, a.steps, a.a))
            rec, mask = attacks.attack(attacks.SimulatedIGService(f, v, rule=rule), plan, x, y)
            d = np.asarray(metrics.normalized_distance(vg, rec, mask))
            cols.setdefault(rule, []).append(f"{plan.name}: {d.mean():.2e} ({d.max():.2e})")
    for rule, cells in cols.items():
        print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
