"""Write notebooks/*.ipynb from the cell sources below, and with ``--execute`` run each one and store its
outputs (figures inline) in the file, as committed.

Usage:
    python notebooks/make_notebooks.py              # sources only (outputs empty)
    python notebooks/make_notebooks.py --execute    # run each (from notebooks/) and keep its outputs

Every notebook runs from any folder and on a fresh machine: it uses ``$JAXRECOVER_CHECKPOINTS/<model>`` or
the repository's ``checkpoints/<model>`` when it is run inside the repository and the checkpoint is there, and
otherwise trains the model with the README's settings in a temporary folder (never in the repository), so its
numbers mean something (>= 95 % test accuracy) and it finishes in well under 3 minutes on a 2-core CPU.
CI runs every notebook (``bash scripts/test.sh``: pytest ``--nbmake``).
"""

import argparse
import sys
from pathlib import Path

import nbformat as nbf

#: The first code cell of every notebook (``{model}``, ``{epochs}``, ``{max_train}`` filled in per notebook).
SETUP = """import os, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt
import jaxrecover as jr
from jaxrecover.checkpoint import checkpoint_exists

MODEL = {model}
# $JAXRECOVER_CHECKPOINTS, else the repository's checkpoints/ when this runs inside it
repo = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists()), None)
folder = os.environ.get("JAXRECOVER_CHECKPOINTS") or (repo / "checkpoints" if repo else None)
CKPT = Path(folder) / MODEL if folder else None
ds = jr.load_dataset("mnist")
if CKPT is None or not checkpoint_exists(CKPT):  # not trained here yet: train it in a temporary folder
    CKPT = Path(tempfile.mkdtemp(prefix="jaxrecover-notebook-")) / MODEL
    jr.train_and_evaluate(jr.TrainConfig(model=MODEL, epochs={epochs}, max_train={max_train}), CKPT, dataset=ds,
                          progress=False)
name, variables, meta = jr.load_trained(CKPT)
print(f"{{name}} from {{CKPT}}: {{meta['epochs']}} epochs, test accuracy {{100 * meta['test_accuracy']:.2f}} %, "
      f"state SHA-256 {{meta['state_sha256'][:16]}}")
model = jr.make_model(name)
v32, v64 = jr.cast_variables(variables, jnp.float32), jr.cast_variables(variables, jnp.float64)"""


def setup(model: str, epochs=None, max_train=None) -> str:
    return SETUP.format(model=repr(model), epochs=epochs, max_train=max_train)


SHOW = """def show(images, titles, size=2.4):
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.4))
    for ax, img, title in zip(np.atleast_1d(axes), images, titles):
        img = np.asarray(img, np.float64).reshape(28, 28)
        lim = np.abs(img).max() or 1.0
        ax.imshow(img, cmap="gray" if title == "input" else "bwr", vmin=None if title == "input" else -lim,
                  vmax=None if title == "input" else lim)
        ax.set_title(title, fontsize=9); ax.axis("off")
    plt.tight_layout(); plt.show()"""

EXPLORE = [
    ("md", """# Exploring jaxrecover: explain a digit, recover its VG from IG answers

The paper's attack in one page: a simulated IG service answers Integrated Gradients (riemann_right, m = 50,
as in the paper); two answers (m = 50 and m = 49, eq. (4)) give back the Vanilla Gradient exactly, in
float64. Uses `checkpoints/lenet` when present (`python train.py --model lenet --out checkpoints/lenet`),
else trains LeNet for two epochs in a temporary folder."""),
    ("code", setup("lenet", epochs=2)),
    ("code", SHOW),
    ("code", """i = 0
x = jnp.asarray(jr.normalize(ds.test_images[i:i + 1], np.float64))
y = jnp.asarray(ds.test_labels[i:i + 1])
vg = jr.explain(jr.VG(), model, v64, x, y)
ig = jr.explain(jr.IG(steps=50), model, v64, x, y)
service = jr.SimulatedIGService(model, v64, rule="riemann_right", steps=50)   # a simulated IG service
rec, mask, report = jr.attack(service, jr.paper_plan(50), x, y)
print(service)
print("distance(VG, IG)        =", float(jr.normalized_distance(vg, ig)[0]))
print("distance(VG, recovered) =", float(jr.normalized_distance(vg, rec)[0]), "from", report.queries, "queries")
assert float(jr.normalized_distance(vg, rec)[0]) < 1e-6
show([x[0], vg[0], ig[0], rec[0]], ["input", "VG", "IG (m=50)", "recovered VG"])"""),
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
precisions on the same images and plots Figure 5. Uses `checkpoints/resnet18` when present, else trains
ResNet18 for one epoch in a temporary folder."""),
    ("code", setup("resnet18", epochs=1) + """
from jaxrecover.protocol import path_gradient_norms
N = int(os.environ.get("JAXRECOVER_NB_N", "8"))"""),
    ("code", """rows = {}
norms = {}
for dtype in (np.float32, np.float64):
    v = jr.cast_variables(variables, dtype)
    x = jr.normalize(ds.test_images[:N], dtype)
    y = ds.test_labels[:N]
    d, secs = jr.run_protocol(model, v, x, y, jr.ProtocolConfig(experiments=("table1", "B", "C")), chunk_size=4,
                              progress=False)
    rows[np.dtype(dtype).name] = {k: jr.summarize(val)["mean"] for k, val in d.items()}
    norms[np.dtype(dtype).name] = path_gradient_norms(model, v, x, y, 50)
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

SERVICES = [
    ("md", """# A deployed service: float32, a fixed step count, and nothing else to go on

TorchServe's VisionHandler explains with Captum's gausslegendre at a FIXED 15 steps in float32 (Alibi: 50,
Vertex AI: Gaussian quadrature). The attacker cannot pick m, so the paper's eq. (4) does not apply. This
notebook identifies such a service from its answers alone and recovers VG with the echo least squares
(`jr.attacks.recover_fixed_steps_lsq`, docs/SERVICES.md), on the TwoLayerNet (`checkpoints/twolayer`, or
trained here with the README's settings: 30 epochs, about 10 s)."""),
    ("code", setup("twolayer")),
    ("code", SHOW),
    ("code", """service = jr.SimulatedIGService(model, v32, rule="gausslegendre", steps=15, fixed_steps=True)
x = np.asarray(jr.normalize(ds.test_images[:2], np.float32))
y = np.asarray(ds.test_labels[:2])
idf = jr.identify_service(service, x[0], int(y[0]))        # answers only: the service's settings are not read
print(f"identified: {idf.rule}, m = {idf.steps}, fixed = {idf.fixed_steps}, dtype {idf.dtype}, "
      f"baseline zeros: {not np.any(idf.baseline)}; {sum(idf.queries.values())} queries")
assert (idf.rule, idf.steps, idf.fixed_steps) == ("gausslegendre", 15, True)"""),
    ("code", """q0 = service.queries
vg_hat, mask, rep = jr.attacks.recover_fixed_steps_lsq(service, x, y, budget=4096)
vg = jr.explain(jr.VG(), model, v32, jnp.asarray(x), jnp.asarray(y))
ig = service(jnp.asarray(x), jnp.asarray(y))
d = np.asarray(jr.normalized_distance(vg.astype(jnp.float64), jnp.asarray(vg_hat, jnp.float64)))
print("distance to the model's own VG per image:", d, "(float32 floor ~1e-7)")
print("queries:", service.queries - q0, "trusted coordinates:", np.asarray(mask).reshape(len(x), -1).mean(1))
assert d.max() < 1e-4
diff = np.asarray(vg_hat[0]) - np.asarray(vg[0])
show([x[0], ig[0], vg[0], vg_hat[0], diff], ["input", "IG answer (m=15)", "true VG", "recovered VG",
                                             f"difference (max {np.abs(diff).max():.0e})"])"""),
    ("md", """The answers are linear in the gradient's values on the pieces of the ray that the 15 nodes see; the
least squares combines answers at many slightly different scales of the input, so the float32 round-off of each
answer averages out instead of hiding single jumps. What stops it: rounding the answers (see `defences.ipynb`)
and per-key query budgets."""),
]

ENDPOINTS = [
    ("md", """# An endpoint over HTTP: serve, identify, recover, audit

`jaxrecover serve CHECKPOINT` starts a KServe (V1 protocol) explanation endpoint with Vertex AI's response
fields; `jaxrecover audit URL` is what an operator runs against it. Here both run from Python: the server is a
real process on a free loopback port, stopped by its own process group at the end. Needs the `endpoints` extra
(`pip install 'jaxrecover[endpoints]'`)."""),
    ("code", setup("twolayer")),
    ("code", """from jaxrecover.audit import audit_endpoint, report_markdown
from jaxrecover.services.process import ServeProcess

log = Path(tempfile.mkdtemp(prefix="jaxrecover-serve-")) / "server.log"
server = ServeProcess(CKPT, ["--rule", "gausslegendre", "--steps", "15"], log=log).start()
print("serving", server.url, "(log:", log, ")")"""),
    ("code", """try:
    x = np.asarray(jr.normalize(ds.test_images[:2], np.float32))
    report = audit_endpoint(server.url, name, x, protocol="kserve", checkpoint=str(CKPT), progress=False)
finally:
    server.stop()
assert not server.running
print(report_markdown(report))"""),
    ("code", """rows = report.rows
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([f"image {i}" for i in range(len(rows))], [r["queries"] for r in rows], color="tab:blue")
for i, r in enumerate(rows):
    ax.annotate(f"distance {r['distance']:.1e}\\n{r['seconds']:.1f} s", (i, r["queries"]), ha="center",
                va="bottom", fontsize=8)
ax.set_ylabel("queries over HTTP"); ax.set_title(f"VG recovered from {report.identification['rule']} "
                                                 f"m={report.identification['steps']} (fixed), float32")
ax.set_ylim(0, 1.3 * max(r["queries"] for r in rows)); plt.tight_layout(); plt.show()
assert all(r["distance"] < 1e-4 for r in rows)"""),
]

EXTRACTION = [
    ("md", """# Extracting the model: the TwoLayerNet, exactly, from IG answers

`jr.extract_two_layer` finds every hidden unit of a two-layer ReLU net from the gradients it recovers from
IG answers (first-layer hyperplanes from gradient jumps along lines, second layer by least squares), up to the
units' order and positive scaling (docs/EXTRACTION.md). Against a float64 service whose step count the
attacker picks, the copy is exact to round-off."""),
    ("code", setup("twolayer")),
    ("code", """import time
from jaxrecover.stealing import extraction_fidelity

service = jr.SimulatedIGService(model, v64, rule="gausslegendre", steps=50)
data = jr.normalize(ds.train_images[-100:], np.float64)   # the attacker's own images
t0 = time.time()
ex = jr.extract_two_layer(service, data, classes=10, progress=False)
test = jr.normalize(ds.test_images[:2000], np.float64)
victim = lambda z: model.batched(v64, jnp.asarray(z))     # the served model's own logits
print(f"{ex.units} units ({len(ex.dead)} dead on the attacker's data), {ex.queries} queries "
      f"(2^{np.log2(ex.queries):.1f}), {time.time() - t0:.0f} s; complete: {ex.complete}")
fid = extraction_fidelity(ex.params, victim, test)
print(f"fidelity on 2,000 test images: max |logit difference| / max |logit| = {fid:.1e}")
assert fid < 1e-9"""),
    ("code", """# the victim's units in the copy's order: each extracted row matches one victim row up to a positive scale
W, V = np.asarray(v64["params"]["Dense_0"]["kernel"]).T, np.asarray(ex.params["W1"])
unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
match = np.argmax(unit(V) @ unit(W).T, axis=1)
fig, axes = plt.subplots(2, 6, figsize=(10, 3.6))
for k in range(6):
    for row, (w, title) in enumerate([(W[match[k]], f"victim unit {match[k]}"), (V[k], f"extracted {k}")]):
        lim = np.abs(w).max()
        axes[row, k].imshow(w.reshape(28, 28), cmap="bwr", vmin=-lim, vmax=lim)
        axes[row, k].set_title(title, fontsize=8); axes[row, k].axis("off")
plt.tight_layout(); plt.show()
print("worst cosine between matched units:", float(np.min(np.sum(unit(V) * unit(W)[match], axis=1))))"""),
]

PATTERNS = [
    ("md", """# PatternNet and PatternAttribution

Kindermans et al. (ICLR 2018): per layer, a signal direction fitted from data replaces the kernel in the
backward pass (`jr.fit_patterns`, one streaming pass; `jr.PatternNet`, `jr.PatternAttribution`, run by
`jr.explain`). docs/PATTERN.md has the signal-quality table and what published patterns leak (the first
layer's weights)."""),
    ("code", setup("twolayer")),
    ("code", SHOW),
    ("code", """fit = jnp.asarray(jr.normalize(ds.train_images[:2000], np.float64))
patterns = jr.fit_patterns(model, v64, fit, progress=False)
print({layer: {e: tuple(a.shape) for e, a in p.items()} for layer, p in patterns.items()})
x = jnp.asarray(jr.normalize(ds.test_images[:3], np.float64))
y = jnp.asarray(ds.test_labels[:3])
maps = {"VG": jr.explain(jr.VG(), model, v64, x, y),
        "IG": jr.explain(jr.IG(steps=50), model, v64, x, y),
        "PatternNet": jr.explain(jr.PatternNet(patterns), model, v64, x, y),
        "PatternAttribution": jr.explain(jr.PatternAttribution(patterns), model, v64, x, y)}
for i in range(2):
    show([x[i]] + [m[i] for m in maps.values()], ["input"] + list(maps))"""),
    ("code", """# how much of each explanation is where the digit is (the input's brightest 20 % of pixels)
bright = np.asarray(x).reshape(3, -1) >= np.quantile(np.asarray(x).reshape(3, -1), 0.8, axis=1, keepdims=True)
for k, m in maps.items():
    a = np.abs(np.asarray(m).reshape(3, -1))
    print(f"{k:20s} share of |attribution| on the digit: {np.mean((a * bright).sum(1) / a.sum(1)):.2f}")"""),
]

BOUNDARY = [
    ("md", """# Boundary Attribution: explain from the nearest decision boundary

`jr.boundary_search` finds the closest boundary point per example (L2 PGD and Carlini-Wagner as Foolbox runs
them, and an exact facet search for ReLU nets); `jr.BSM`, `jr.BIG` explain with it as the reference
(docs/BOUNDARY.md)."""),
    ("code", setup("twolayer")),
    ("code", SHOW),
    ("code", """x = jnp.asarray(jr.normalize(ds.test_images[:4], np.float64))
labels = jnp.argmax(model.batched(v64, x), axis=1).astype(jnp.int32)
res = jr.boundary_search(model, v64, x, labels, methods=("pgd", "facet"))
print("boundary found:", np.asarray(res.success), "L2 distance (model units):", np.round(np.asarray(res.distance), 3))
print("class at the boundary point:", np.asarray(res.label), "predicted:", np.asarray(labels))
big = jr.boundary_attributions(jr.BIG(steps=50), model, v64, x, labels, res)
bsm = jr.boundary_attributions(jr.BSM(), model, v64, x, labels, res)
ig = jr.explain(jr.IG(steps=50), model, v64, x, labels)
for i in range(2):
    show([x[i], res.point[i], ig[i], big[i], bsm[i]], ["input", "boundary point", "IG (zero baseline)", "BIG", "BSM"])
assert bool(np.all(np.asarray(res.label)[np.asarray(res.success)] != np.asarray(labels)[np.asarray(res.success)]))"""),
]

DEFENCES = [
    ("md", """# Defences: what stops the attack, and what it costs the explanation

Each defence wraps a service and is a service (`jr.RoundAnswers`, `jr.GaussianNoise`, `jr.TopK`,
`jr.RandomSteps`, ...). Below: the attacker's best exact plan against each (the step count left free, so
without a defence VG comes back exactly), the distance it reaches, and the utility cost: how far the defended
answer is from the true IG. docs/DEFENCES.md measures the adaptive attacks (averaging, least squares) too."""),
    ("code", setup("twolayer")),
    ("code", """x = jnp.asarray(jr.normalize(ds.test_images[:16], np.float64))
y = jnp.asarray(ds.test_labels[:16])
vg = jr.explain(jr.VG(), model, v64, x, y)
ig = jr.explain(jr.IG(steps=50, rule="gausslegendre"), model, v64, x, y)

def base():
    return jr.SimulatedIGService(model, v64, rule="gausslegendre", steps=50)

defended = {"none": base(), "round:3": jr.RoundAnswers(base(), 3), "round:2": jr.RoundAnswers(base(), 2),
            "noise 1%": jr.GaussianNoise(base(), 0.01), "top-k 100": jr.TopK(base(), 100)}
rows = {}
for label, svc in defended.items():
    rec, _, _ = jr.attack(svc, jr.best_plan(svc), x, y)
    utility = jr.normalized_distance(ig, svc(x, y))                # what the defence does to the answer
    rows[label] = (float(np.median(jr.normalized_distance(vg, rec))), float(np.median(utility)))
    print(f"{label:10s} attack distance {rows[label][0]:.1e}   answer changed by {rows[label][1]:.1e}")"""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 3.5))
labels = list(rows)
ax.bar(np.arange(len(labels)) - 0.2, [max(rows[k][0], 1e-17) for k in labels], 0.4, label="VG recovered: distance")
ax.bar(np.arange(len(labels)) + 0.2, [max(rows[k][1], 1e-17) for k in labels], 0.4, label="answer changed by")
ax.set_xticks(range(len(labels)), labels); ax.set_yscale("log"); ax.legend(fontsize=8)
ax.set_title("median over 16 test images (paper's metric)", fontsize=9); plt.tight_layout(); plt.show()"""),
]

NOTEBOOKS = {"explore": EXPLORE, "precision": PRECISION, "services": SERVICES, "endpoints": ENDPOINTS,
             "extraction": EXTRACTION, "patterns": PATTERNS, "boundary": BOUNDARY, "defences": DEFENCES}


def build(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="run each notebook and store its outputs (default: no)")
    p.add_argument("--only", default=None, help="comma-separated notebook names (default: all)")
    a = p.parse_args(argv)
    out = Path(__file__).resolve().parent
    names = a.only.split(",") if a.only else list(NOTEBOOKS)
    unknown = set(names) - set(NOTEBOOKS)
    if unknown:
        print(f"error: unknown notebooks {sorted(unknown)}; choose from {', '.join(NOTEBOOKS)}", file=sys.stderr)
        return 2
    for n in names:
        nb = build(NOTEBOOKS[n])
        if a.execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
        path = out / f"{n}.ipynb"
        tmp = path.with_suffix(".ipynb.tmp")
        nbf.write(nb, tmp)
        tmp.replace(path)  # never a half-written notebook
        print("wrote", path, f"({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
