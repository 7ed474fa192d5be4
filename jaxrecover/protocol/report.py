"""The Markdown report of protocol runs: Tables 1-4 with the paper's numbers beside ours, from result JSON."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from ..models import MODEL_NAMES
from .experiments import EXPERIMENTS, PAPER, summarize_results

__all__ = ["load_results", "markdown_report", "table_title", "run_files", "verify_record", "record_sha256",
           "distances_sha256"]

#: A run's JSON file name (``evaluation._run_name``); other JSON files in a results folder are not runs.
RUN_FILE = re.compile(r"^[A-Za-z0-9_]+_float(32|64)_[a-z-]+_n\d+_m\d+(_bnbatch)?\.json$")


def run_files(directory: str | Path) -> list[Path]:
    """The run JSON files in ``directory`` (by name; e.g. a ``notes.json`` beside them is not a run)."""
    directory = Path(directory)
    return sorted(p for p in directory.glob("*.json") if RUN_FILE.match(p.name)) if directory.is_dir() else []


def distances_sha256(dists) -> str:
    """SHA-256 of a run's per-image distances (every experiment, in name order, as float64)."""
    h = hashlib.sha256()
    for k in sorted(dists):
        h.update(np.asarray(dists[k], np.float64).tobytes())
    return h.hexdigest()


def record_sha256(rec: dict) -> str:
    """SHA-256 of a run record's canonical JSON, without its own ``record_sha256`` field."""
    body = {k: v for k, v in rec.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_FIELDS = {"model": str, "dtype": str, "mode": str, "dataset": str, "n": int, "steps": int, "a": (int, float),
           "results": dict, "wall_seconds": (int, float), "machine": dict, "version": str}


def verify_record(path: Path, rec) -> None:
    """A clear error unless ``rec`` (read from ``path``) is a complete, unedited run record.

    Checks the fields the report reads and their types, the record's own SHA-256 (``record_sha256``,
    written since 0.3), and, where the run's ``.distances.npz`` is beside it, that its numbers are the
    summary of those distances (``distances_sha256``). A record with neither is accepted with a warning.
    """
    fix = "delete it (and its .distances.npz) and rerun evaluate.py"
    if not isinstance(rec, dict):
        raise ValueError(f"result file {path} holds a JSON {type(rec).__name__}, not a run record; {fix}")
    for key, kind in _FIELDS.items():
        if key not in rec:
            raise ValueError(f"result file {path} lacks {key!r}; {fix}")
        if isinstance(rec[key], bool) or not isinstance(rec[key], kind):
            raise ValueError(f"result file {path}: {key!r} is {rec[key]!r}, not a {getattr(kind, '__name__', 'number')}; "
                             f"{fix}")
    for e, summary in rec["results"].items():
        for stat in ("mean", "var", "median", "max"):
            v = summary.get(stat) if isinstance(summary, dict) else None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"result file {path}: results[{e!r}][{stat!r}] is {v!r}, not a number; {fix}")
    checked = False
    if "record_sha256" in rec:
        if rec["record_sha256"] != record_sha256(rec):
            raise ValueError(f"result file {path} was edited or damaged (its record_sha256 does not match its "
                             f"content); {fix}")
        checked = True
    npz = path.with_suffix(".distances.npz")
    if npz.exists() and "distances_sha256" in rec:
        try:
            with np.load(npz) as f:
                dists = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"{npz} is unreadable ({err}); {fix}") from None
        if distances_sha256(dists) != rec["distances_sha256"]:
            raise ValueError(f"{npz} does not match distances_sha256 in {path} (one was edited or damaged); {fix}")
        again = summarize_results(dists)
        for e, summary in rec["results"].items():
            for stat in ("mean", "var", "median", "max"):
                want, got = again.get(e, {}).get(stat), summary[stat]
                if want is None or not (np.isclose(want, got, rtol=1e-12, atol=0) or (np.isnan(want) and np.isnan(got))):
                    raise ValueError(f"result file {path}: results[{e!r}][{stat!r}] = {got!r} is not what its "
                                     f"distances ({npz.name}) give ({want!r}): the file was edited; {fix}")
        checked = True
    if not checked:
        warnings.warn(f"result file {path} has no record_sha256 and no .distances.npz beside it: its numbers are "
                      "not checked", RuntimeWarning, stacklevel=3)


def load_results(directory: str | Path) -> list[dict]:
    """Every run JSON in ``directory`` (sorted by model order, dtype), each checked by :func:`verify_record`.

    Raises:
      FileNotFoundError: the directory holds no run JSON (nothing to report).
      ValueError: a run JSON is unreadable, incomplete or edited (naming the file and the fix).
    """
    directory = Path(directory)
    paths = run_files(directory)
    if not paths:
        raise FileNotFoundError(f"no result JSON in {directory}; run evaluate.py with --out {directory} first")
    recs = []
    for p in paths:
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"result file {p} is unreadable ({e}); delete it and rerun evaluate.py") from e
        verify_record(p, rec)
        recs.append(rec)
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
