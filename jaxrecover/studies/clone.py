"""docs/EXTRACTION.md's clone table: students of LeNet trained from B queries of logits, IG answers or recovered VG.

Victim: the trained LeNet (default checkpoint), float32, behind our IG service (riemann_right, m = 50, zero
baseline). For each query budget B (queries, not inputs), input source ("train": MNIST training images in a fixed
random order - in-distribution images the victim has seen, none of them a test image - or "noise": uniform noise
images, the data-free variant) and student architecture (LeNet, and the smaller TwoLayerNet: not architecture
copying), a student is trained (``stealing.train_clone``, Adam, ``steps`` steps of 64) under three kinds of
answers:

* logits: B inputs, the victim's logits (one query each);
* ig: B inputs, logits + the IG answer of the predicted class as it comes (one query each);
* vg: B/2 inputs, logits + VG recovered from IG by the service's best plan (two queries each).

Measured on the test images: agreement with the victim's predictions, test accuracy, and the paper's distance
between the student's and the victim's VG. One unit per (source, student, kind, budget). A figure of agreement against B goes to
``OUT/clone.png``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..attacks import attack, best_plan
from ..data import normalize
from ..fileio import atomic_savefig
from ..models import init_variables, make_model
from ..services import SimulatedIGService
from ..stealing import CLONE_KINDS, CloneData, clone_metrics, train_clone, victim_reference
from ..training import TrainConfig
from .base import Study, Unit, option

__all__ = ["CloneStudy"]

SOURCES = ("train", "noise")


def queries(service, victim, v, pool, kind, budget):
    """``(CloneData, queries spent)`` for ``budget`` queries of ``kind`` on inputs drawn from ``pool``."""
    n = budget // 2 if kind == "vg" else budget
    x = jnp.asarray(pool[:n])
    logits = np.asarray(jax.vmap(lambda z: victim(v, z))(x))
    target = np.argmax(logits, axis=1)
    service.reset_counters()
    if kind == "logits":
        return CloneData(np.asarray(x), logits), n
    if kind == "ig":
        answers = service(x, jnp.asarray(target))
        return CloneData(np.asarray(x), logits, target, np.asarray(answers), np.zeros(x.shape, np.float32)), \
            service.queries
    vg, _, _ = attack(service, best_plan(service), x, jnp.asarray(target))
    return CloneData(np.asarray(x), logits, target, np.asarray(vg)), service.queries


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
            for kind in CLONE_KINDS:
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
    out = ["train_s: wall seconds of the student's training.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["source"], r["student"], r["kind"], r["budget"])):
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) and c != "train_s" else str(r[c])
                                     for c in cols) + " |")
    out += ["", "Queries to reach a given agreement (log-linear between measured budgets; '>' = not reached at the "
            "largest budget):", "", "| source | student | agreement | " + " | ".join(CLONE_KINDS)
            + " | logits / vg |", "|---|---|---|" + "---|" * (len(CLONE_KINDS) + 1)]
    for source, student in sorted({(r["source"], r["student"]) for r in rows}):
        for target in targets:
            need = {}
            for kind in CLONE_KINDS:
                sel = [r for r in rows if (r["source"], r["student"], r["kind"]) == (source, student, kind)]
                need[kind] = (queries_for(sel, target), max((r["queries"] for r in sel), default=None))
            cells = [("-" if mx is None else f"> {mx}") if q is None else f"{q:.0f}" for q, mx in need.values()]
            (ql, _), (qv, _) = need["logits"], need["vg"]
            ratio = f"{ql / qv:.1f}x" if ql is not None and qv is not None else (
                "> " + f"{need['logits'][1] / qv:.1f}x" if qv is not None and need["logits"][1] else "-")
            out.append(f"| {source} | {student} | {target:.0%} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def parse_grid(spec: str) -> list[tuple[str, str, int]]:
    """``"SOURCES:STUDENTS:BUDGETS"`` (each a ``/``-separated list) -> ``[(source, student, budget)]``."""
    try:
        sources, students, budgets = spec.split(":")
        out = [(so, st, int(b)) for so in sources.split("/") for st in students.split("/") for b in budgets.split("/")]
    except ValueError:
        raise ValueError(f"grid {spec!r}: give SOURCES:STUDENTS:BUDGETS, e.g. train:lenet/twolayer:100/300") from None
    bad = {so for so, _, _ in out} - set(SOURCES)
    if bad:
        raise ValueError(f"grid {spec!r}: unknown sources {sorted(bad)}; choose from {list(SOURCES)}")
    return out


@dataclasses.dataclass(frozen=True)
class CloneConfig:
    grids: tuple[str, ...] = option(("train:lenet/twolayer:100/300/1000/3000", "noise:lenet:300/3000/10000",
                                     "train:lenet:8000"),
                                    "SOURCES:STUDENTS:BUDGETS products (lists split by /), e.g. train:lenet:100/300")
    steps: int = option(500, "Adam steps of 64 per student")


class CloneStudy(Study):
    name = "clone"
    title = "Students of LeNet trained from logits, IG answers or recovered VG (agreement against queries)"
    Config = CloneConfig
    doc, block = "docs/EXTRACTION.md", "clone_table"
    version = 2

    def checkpoints(self, cfg):
        return {"lenet": TrainConfig(model="lenet")}

    def quick(self, cfg):
        return dataclasses.replace(cfg, grids=("train:twolayer:100",), steps=20)

    def units(self, cfg):
        cells = list(dict.fromkeys(c for g in cfg.grids for c in parse_grid(g)))
        return [Unit({"source": so, "student": st, "kind": k, "budget": b, "steps": cfg.steps}, ("lenet",),
                     label=f"{so} {st} {k} {b}") for so, st, b in cells for k in CLONE_KINDS]
    def _pools(self, ds):
        order = np.random.default_rng(5).permutation(len(ds.train_images))
        return {"train": normalize(ds.train_images[order], dtype=np.float32),
                "noise": normalize((np.random.default_rng(7).random((10000, 28, 28)) * 255).astype(np.uint8),
                                   dtype=np.float32)}

    def run(self, unit, ctx):
        s = unit.settings
        victim, v, _ = ctx.checkpoint("lenet")
        ds = ctx.dataset()
        pool = self._pools(ds)[s["source"]]
        if s["budget"] > len(pool):
            raise ValueError(f"budget {s['budget']} is above the {len(pool)} inputs of the {s['source']} pool")
        service = SimulatedIGService(victim, v)
        test_x = jnp.asarray(normalize(ds.test_images, dtype=np.float32))
        data, spent = queries(service, victim, v, pool, s["kind"], s["budget"])
        model = make_model(s["student"])
        init = init_variables(s["student"], jax.random.key(s["budget"]), jnp.float32)
        t0 = time.time()
        params, losses = train_clone(model, init, data, kind=s["kind"], steps=s["steps"], progress=False)
        train_s = time.time() - t0
        m = clone_metrics(model, params, victim, v, test_x, ds.test_labels,
                          reference=victim_reference(victim, v, test_x))
        return [{**s, "queries": spent, "inputs": int(data.x.shape[0]), **m, "final_loss": float(losses[-1]),
                 "train_s": round(train_s, 1)}]

    def finish(self, rows, cfg, ctx):
        figure(rows, ctx.out / "clone.png")

    def markdown(self, rows, cfg):
        return markdown(rows)
