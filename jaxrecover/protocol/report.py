"""The Markdown report of protocol runs: Tables 1-4 with the paper's numbers beside ours, from result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..models import MODEL_NAMES
from .experiments import EXPERIMENTS, PAPER

__all__ = ["load_results", "markdown_report", "table_title"]


def load_results(directory: str | Path) -> list[dict]:
    """Every run JSON in ``directory`` (sorted by model order, dtype).

    Raises:
      FileNotFoundError: the directory holds no run JSON (nothing to report).
    """
    directory = Path(directory)
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no result JSON in {directory}; run evaluate.py with --out {directory} first")
    recs = []
    for p in paths:
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"result file {p} is unreadable ({e}); delete it and rerun evaluate.py") from e
    order = {m: i for i, m in enumerate(MODEL_NAMES)}
    return sorted(recs, key=lambda r: (order.get(r["model"], 99), r["dtype"], r["mode"], r["n"]))


def _fmt(v):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.3e}" if abs(v) < 1e-2 else f"{v:.3f}"


def _one(values) -> str | None:
    values = sorted({str(v) for v in values})
    return values[0] if len(values) == 1 else None


def table_title(experiment: str, rows: list[dict]) -> str:
    """A table's title stating the step count m and a actually used (when all rows share them)."""
    m, a = _one(r["steps"] for r in rows), _one(r["a"] for r in rows)
    if experiment == "table1":
        return f"Table 1: distance(VG, IG_{m or 'm'}) (reference)"
    if experiment == "A":
        return "Table 2: Experiment A, eq. (2), no-bias models" + (f", m = {m}" if m else "")
    if experiment == "B":
        return "Table 3: Experiment B, eq. (4)" + (f", m = {m} and {int(m) - 1}" if m else ", m and m - 1")
    return "Table 4: Experiment C, eq. (3)" + (f", m = {m}" if m else "") + (f", a = {a}" if a else "")


def markdown_report(records: list[dict]) -> str:
    """Tables 1-4 with the paper's mean and variance beside ours, from result records."""
    lines = []
    for e in EXPERIMENTS:
        rows = [r for r in records if e in r["results"]]
        if not rows:
            continue
        lines += [f"### {table_title(e, rows)}", "",
                  "| model | dataset (N) | dtype | mode | m | a | mean | variance | median | max | paper mean "
                  "| paper var | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r["results"][e]
            p = PAPER[e].get(r["model"]) or (None, None)
            a = r["a"] if e == "C" else "-"
            lines.append(f"| {r['model']} | {r['dataset']} ({r['n']}) | {r['dtype']} | {r['mode']} | {r['steps']} "
                         f"| {a} | {_fmt(s['mean'])} | {_fmt(s['var'])} | {_fmt(s['median'])} | {_fmt(s['max'])} "
                         f"| {_fmt(p[0])} | {_fmt(p[1])} | {r['wall_seconds']:.0f} |")
        lines.append("")
    fig = [r for r in records if "fig5" in r]
    if fig:
        lines += ["### Figure 5 summary: ||grad f(x)|| / max_i ||grad f(i/m x)|| (over the first images)", "",
                  "| model | dtype | m | images | median ratio | smallest ratio |", "|---|---|---|---|---|---|"]
        for r in fig:
            f5 = r["fig5"]
            lines.append(f"| {r['model']} | {r['dtype']} | {r['steps']} | {f5['n_images']} "
                         f"| {f5['end_over_max_median']:.3e} | {f5['end_over_max_min']:.3e} |")
        lines.append("")
    if records:
        r0 = records[0]
        mach = r0["machine"]
        lines += [f"Machine: {mach['processor']}, {mach['cpu_count']} cores, JAX {mach['jax_version']} "
                  f"({mach['jax_backend']}); jaxrecover {r0['version']}.",
                  f"Command: `{r0['command']}`" if r0.get("command") else "", ""]
    return "\n".join(lines)
