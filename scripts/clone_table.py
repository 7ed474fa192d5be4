"""docs/EXTRACTION.md's clone table: students of LeNet trained from B queries of logits, IG answers or recovered VG.

Usage:  python scripts/clone_table.py [--budgets 100,300,1000,3000] [--students lenet,twolayer]
                                      [--sources train,noise] [--steps 500] [--out results/clone]
                                      [--docs docs/EXTRACTION.md]

Rows accumulate over runs with different grids (e.g. a second run ``--sources noise --budgets 300,3000
--students lenet``); the docs block lists every command whose rows it shows; ``--report`` rewrites the table,
figure and docs block from the rows so far without training.

Victim: the trained LeNet (checkpoints/lenet), float32, behind our IG service (riemann_right, m = 50, zero
baseline). For each query budget B (queries, not inputs), input source ("train": MNIST training images in a fixed
random order - the offline MNIST has only 8,000 training + 2,000 test images and the victim was trained on all
8,000, so the attacker's inputs are in-distribution images the victim has seen; none of them is a test image -
or "noise": uniform noise images, the data-free variant) and student architecture (LeNet, and the smaller TwoLayerNet: not architecture copying),
a student is trained (jr.stealing.train_clone, Adam, --steps steps of 64) under three kinds of answers:
  logits  B inputs, the victim's logits (one query each);
  ig      B inputs, logits + the IG answer of the predicted class as it comes (one query each);
  vg      B/2 inputs, logits + VG recovered from IG by the service's best plan (two queries each).
Measured on the 2,000 test images: agreement with the victim's predictions, test accuracy, and the paper's
distance between the student's and the victim's VG. Rows go to <out>/rows.json (resume; keyed by the victim's
weights and the settings); a figure of agreement against B goes to <out>/clone.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxrecover as jr
from jaxrecover import attacks as R
from jaxrecover import stealing as ST
from jaxrecover.fileio import atomic_savefig, atomic_write_text, write_marked_block

jax.config.update("jax_enable_x64", True)

SETTINGS_VERSION = 2


def queries(service, victim, v, pool, kind, budget):
    """``(CloneData, queries spent)`` for ``budget`` queries of ``kind`` on inputs drawn from ``pool``."""
    n = budget // 2 if kind == "vg" else budget
    x = jnp.asarray(pool[:n])
    logits = np.asarray(jax.vmap(lambda z: victim(v, z))(x))
    target = np.argmax(logits, axis=1)
    service.reset_counters()
    if kind == "logits":
        return ST.CloneData(np.asarray(x), logits), n
    if kind == "ig":
        answers = service(x, jnp.asarray(target))
        return ST.CloneData(np.asarray(x), logits, target, np.asarray(answers), np.zeros(x.shape, np.float32)), \
            service.queries
    vg, _ = R.attack(service, R.best_plan(service), x, jnp.asarray(target))
    return ST.CloneData(np.asarray(x), logits, target, np.asarray(vg)), service.queries


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="100,300,1000,3000")
    ap.add_argument("--students", default="lenet,twolayer")
    ap.add_argument("--sources", default="train,noise")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="results/clone")
    ap.add_argument("--docs", default=None, help="fill the <!-- clone_table:begin/end --> block of this file")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: the table, figure and docs block from the rows already in <out>/rows.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.json")
    rows = _rows(path)
    command = "python scripts/clone_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "report")
    ds = jr.load_dataset("mnist")
    _, v, meta = jr.load_trained("checkpoints/lenet", model="lenet")
    victim = jr.make_model("lenet")
    service = jr.SimulatedIGService(victim, v)
    key = {"weights_sha256": meta["state_sha256"], "steps": args.steps, "version": SETTINGS_VERSION}
    rows = [r for r in rows if r.get("key") == key]
    done = {(r["source"], r["student"], r["kind"], r["budget"]) for r in rows}
    order = np.random.default_rng(5).permutation(len(ds.train_images))
    pools = {"train": jr.normalize(ds.train_images[order], dtype=np.float32),
             "noise": jr.normalize((np.random.default_rng(7).random((10000, 28, 28)) * 255).astype(np.uint8),
                                   dtype=np.float32)}
    unknown = set(args.sources.split(",")) - set(pools)
    if unknown:
        raise SystemExit(f"unknown --sources {sorted(unknown)}; choose from {sorted(pools)}")
    for source in args.sources.split(","):
        if max(int(b) for b in args.budgets.split(",")) > len(pools[source]):
            raise SystemExit(f"--budgets above {len(pools[source])}: the {source} pool has {len(pools[source])} inputs")
    test_x = jnp.asarray(jr.normalize(ds.test_images, dtype=np.float32))
    reference = ST.victim_reference(victim, v, test_x)
    tasks = [] if args.report else [
             (s, st, k, int(b)) for s in args.sources.split(",") for st in args.students.split(",")
             for b in args.budgets.split(",") for k in ST.CLONE_KINDS]
    for source, student, kind, budget in tqdm(tasks, desc="students", unit="student"):
        if (source, student, kind, budget) in done:
            continue
        data, spent = queries(service, victim, v, pools[source], kind, budget)
        model = jr.make_model(student)
        init = jr.init_variables(student, jax.random.key(budget), jnp.float32)
        t0 = time.time()
        params, losses = ST.train_clone(model, init, data, kind=kind, steps=args.steps, progress=False)
        train_s = time.time() - t0
        m = ST.clone_metrics(model, params, victim, v, test_x, ds.test_labels, reference=reference)
        rows.append({"source": source, "student": student, "kind": kind, "budget": budget, "queries": spent,
                     "inputs": int(data.x.shape[0]), **m, "final_loss": float(losses[-1]),
                     "train_s": round(train_s, 1), "key": key, "command": command})
        atomic_write_text(path, json.dumps({"command": command, "rows": rows}, indent=1))
    figure(rows, os.path.join(args.out, "clone.png"))
    text = markdown(rows)
    print(text)
    if args.docs:
        write_marked_block(args.docs, "clone_table", text)


def figure(rows, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sources = sorted({r["source"] for r in rows})
    students = sorted({r["student"] for r in rows})
    fig, axes = plt.subplots(len(sources), len(students), figsize=(5 * len(students), 3.6 * len(sources)),
                             squeeze=False)
    for i, source in enumerate(sources):
        for j, student in enumerate(students):
            ax = axes[i][j]
            for kind in ST.CLONE_KINDS:
                pts = sorted((r["queries"], r["agreement"]) for r in rows
                             if r["source"] == source and r["student"] == student and r["kind"] == kind)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=kind)
            ax.set_xscale("log")
            ax.set_xlabel("queries")
            ax.set_ylabel("agreement with the victim")
            ax.set_title(f"student {student}, inputs: {source}")
            ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=110)


def queries_for(rows, target):
    """Queries at which the agreement curve (log-linear between measured budgets) first reaches ``target``;
    None when no measured budget reaches it."""
    pts = sorted((r["queries"], r["agreement"]) for r in rows)
    for (q0, a0), (q1, a1) in zip([(None, None)] + pts[:-1], pts):
        if a1 >= target:
            if q0 is None or a0 >= target:
                return q1
            return float(np.exp(np.log(q0) + (target - a0) / (a1 - a0) * (np.log(q1) - np.log(q0))))
    return None


def markdown(rows, targets=(0.9, 0.95)):
    cols = ["source", "student", "kind", "budget", "queries", "inputs", "agreement", "accuracy", "vg_distance",
            "train_s"]
    commands = sorted({r["command"] for r in rows})
    out = ["Generated by " + "; ".join(f"`{c}`" for c in commands)
           + " (rows: results/clone/rows.json; train_s: wall seconds on this machine, 2 cores).", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["source"], r["student"], r["kind"], r["budget"])):
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) and c != "train_s" else str(r[c])
                                     for c in cols) + " |")
    out += ["", "Queries to reach a given agreement (log-linear between measured budgets; '>' = not reached at the "
            "largest budget):", "", "| source | student | agreement | " + " | ".join(ST.CLONE_KINDS)
            + " | logits / vg |", "|---|---|---|" + "---|" * (len(ST.CLONE_KINDS) + 1)]
    for source, student in sorted({(r["source"], r["student"]) for r in rows}):
        for target in targets:
            need = {}
            for kind in ST.CLONE_KINDS:
                sel = [r for r in rows if (r["source"], r["student"], r["kind"]) == (source, student, kind)]
                need[kind] = (queries_for(sel, target), max((r["queries"] for r in sel), default=None))
            cells = [("-" if mx is None else f"> {mx}") if q is None else f"{q:.0f}" for q, mx in need.values()]
            (ql, _), (qv, _) = need["logits"], need["vg"]
            ratio = f"{ql / qv:.1f}x" if ql is not None and qv is not None else (
                "> " + f"{need['logits'][1] / qv:.1f}x" if qv is not None and need["logits"][1] else "-")
            out.append(f"| {source} | {student} | {target:.0%} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def _rows(path):
    """The stored rows (resume), or exit with one line when the file is damaged."""
    from jaxrecover.fileio import load_rows

    try:
        return load_rows(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

