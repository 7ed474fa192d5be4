"""Write notebooks/*.ipynb from the cell sources below (outputs are never committed).

Usage: python notebooks/make_notebooks.py
"""

from pathlib import Path

import nbformat as nbf

#: The first code cell of both notebooks: the repository's checkpoint, or a tiny one in a temporary folder.
SETUP = """import os, tempfile
from pathlib import Path
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt
import jaxrecover as jr
from jaxrecover.checkpoint import checkpoint_exists

MODEL = {model}
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists())  # the repository
CKPT = ROOT / "checkpoints" / MODEL
ds = jr.load_dataset("mnist")
if not checkpoint_exists(CKPT):  # nothing trained yet: a tiny model in a temporary folder, never in the tree
    CKPT = Path(tempfile.mkdtemp(prefix="jaxrecover-notebook-")) / MODEL
    jr.train_and_evaluate(jr.TrainConfig(model=MODEL, epochs=1, max_train={max_train}), CKPT, dataset=ds,
                          progress=False)
name, variables, meta = jr.load_trained(CKPT)
print(name, "from", CKPT, "test accuracy", meta["test_accuracy"], "epochs", meta["epochs"])"""

EXPLORE = [
    ("md", """# Exploring jaxrecover: explain a digit, recover its VG from IG answers

Loads a trained checkpoint from the repository's `checkpoints/<MODEL>` (written by
`python train.py --model <MODEL> --out checkpoints/<MODEL>`). Without one it trains a small model for a few
seconds in a temporary folder, so the notebook also runs on a fresh machine (CI does that) and writes nothing
into the repository."""),
    ("code", SETUP.format(model='os.environ.get("JAXRECOVER_NB_MODEL", "lenet")', max_train=1024)),
    ("code", """model = jr.make_model(name)
v64 = jr.cast_variables(variables, jnp.float64)
i = 0
x = jnp.asarray(jr.normalize(ds.test_images[i:i + 1], np.float64))
y = jnp.asarray(ds.test_labels[i:i + 1])
vg = jr.explain(jr.VG(), model, v64, x, y)
ig = jr.explain(jr.IG(steps=50), model, v64, x, y)
service = jr.SimulatedIGService(model, v64, rule="riemann_right", steps=50)   # a simulated IG service
plan = jr.paper_plan(50) if not name.endswith("nobias") else jr.nobias_plan("riemann_right", 50)
rec, mask, _ = jr.attack(service, plan, x, y)
print(service)
print(plan)
print("distance(VG, IG)        =", float(jr.normalized_distance(vg, ig)[0]))
print("distance(VG, recovered) =", float(jr.normalized_distance(vg, rec)[0]))
assert float(jr.normalized_distance(vg, rec)[0]) < 1e-6"""),
    ("code", """fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, (title, img) in zip(axes, [("input", x[0]), ("VG", vg[0]), ("IG (m=50)", ig[0]), ("recovered VG", rec[0])]):
    img = np.asarray(img)[..., 0]
    lim = np.abs(img).max()
    ax.imshow(img, cmap="gray" if title == "input" else "bwr", vmin=None if title == "input" else -lim,
              vmax=None if title == "input" else lim)
    ax.set_title(title); ax.axis("off")
plt.show()"""),
    ("md", """## Every public quadrature rule

The cheapest exact plan of each rule (docs/RECOVERY.md), asked of a simulated service using that rule."""),
    ("code", """for rule in jr.RULES:
    p = jr.minimal_plan(rule)
    r, _, _ = jr.attack(jr.SimulatedIGService(model, v64, rule=rule), p, x, y)
    print(f"{rule:18s} {p.evaluations:2d} evaluations  distance {float(jr.normalized_distance(vg, r)[0]):.1e}")"""),
]

PRECISION = [
    ("md", """# float32 vs float64: does cancellation break eq. (4) on ResNet18?

The paper found that eq. (4) fails on ResNet18 in float32 (mean distance 1.198) and blamed cancellation:
the gradient at x is tiny next to the others on the IG path (its Figure 5). This notebook measures both
precisions on the same images and plots Figure 5. Uses `checkpoints/resnet18` when present; otherwise a
briefly trained one in a temporary folder (CI), so its numbers are then only a smoke test."""),
    ("code", SETUP.format(model='"resnet18"', max_train=256) + """
from jaxrecover.protocol import path_gradient_norms
N = int(os.environ.get("JAXRECOVER_NB_N", "8"))
f = jr.make_model(name)"""),
    ("code", """rows = {}
norms = {}
for dtype in (np.float32, np.float64):
    v = jr.cast_variables(variables, dtype)
    x = jr.normalize(ds.test_images[:N], dtype)
    y = ds.test_labels[:N]
    d, secs = jr.run_protocol(f, v, x, y, jr.ProtocolConfig(experiments=("table1", "B", "C")), chunk_size=4,
                              progress=False)
    rows[np.dtype(dtype).name] = {k: jr.summarize(val)["mean"] for k, val in d.items()}
    norms[np.dtype(dtype).name] = path_gradient_norms(f, v, x, y, 50)
for dt, r in rows.items():
    print(dt, {k: f"{val:.3e}" for k, val in r.items()})
assert rows["float64"]["B"] <= rows["float32"]["B"]"""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 4))
for dt, nrm in norms.items():
    i = np.arange(1, nrm.shape[1] + 1)
    q25, med, q75 = np.quantile(nrm, [0.25, 0.5, 0.75], axis=0)
    ax.plot(i, med, label=dt); ax.fill_between(i, q25, q75, alpha=0.2)
ax.set_yscale("log"); ax.set_xlabel("i"); ax.set_ylabel("||grad f((i/50) x)||"); ax.legend()
plt.show()
ratio = norms["float64"][:, -1] / norms["float64"].max(axis=1)
print("||grad f(x)|| / max_i ||grad f(i/m x)||: median", np.median(ratio), "min", ratio.min())"""),
]


def build(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
    return nb


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "notebooks"
    out.mkdir(exist_ok=True)
    nbf.write(build(EXPLORE), out / "explore.ipynb")
    nbf.write(build(PRECISION), out / "precision.ipynb")
    print("wrote", out / "explore.ipynb", out / "precision.ipynb")
