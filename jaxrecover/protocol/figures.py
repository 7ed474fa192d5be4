"""Figures 4 and 5 of the paper, as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["figure4", "figure5"]

_EXP_NAMES = {"A": "eq. (2)", "B": "eq. (4)", "C": "eq. (3)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure4(per_model: dict, path: Path, dtype: str, steps: int, a: float) -> Path | None:
    """VG, IG and the recovered VG side by side, one row per (model, experiment).

    Args:
      per_model: ``{model: (x[k, 28, 28, 1], {"VG", "IG", "A", "B", "C": [k, 28, 28, 1]})}``.
      steps, a: the run's m and a (stated in the title).
    """
    if not per_model:
        return None
    plt = _plt()
    rows = [(m, e) for m in per_model for e in (("A",) if m.endswith("nobias") else ("B", "C"))]
    k = next(iter(per_model.values()))[0].shape[0]
    fig, axes = plt.subplots(len(rows), 4 * k, figsize=(1.6 * 4 * k, 1.7 * len(rows)), squeeze=False)
    for r, (model, e) in enumerate(rows):
        x, ex = per_model[model]
        for j in range(k):
            panels = [("input", x[j]), ("VG", ex["VG"][j]), (f"IG_{steps}", ex["IG"][j]),
                      (f"rec. {_EXP_NAMES[e]}", ex[e][j])]
            for c, (title, img) in enumerate(panels):
                ax = axes[r, 4 * j + c]
                img = np.asarray(img, np.float64)[..., 0]
                if title == "input":
                    ax.imshow(img, cmap="gray")
                else:
                    lim = np.nanmax(np.abs(img)) or 1.0
                    ax.imshow(img, cmap="bwr", vmin=-lim, vmax=lim)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 or c == 3:
                    ax.set_title(title, fontsize=7)
            axes[r, 0].set_ylabel(f"{model}\n{e}", fontsize=7)
    title = (f"Figure 4 ({dtype}): VG, IG_{steps} and recovered VG (eq. 4: m = {steps} and {steps - 1}; "
             f"eq. 3: a = {a:g})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Title": title})
    plt.close(fig)
    return path


def figure5(per_model: dict, path: Path, dtype: str) -> Path | None:
    """||grad f((i/m) x)|| for i = 1..m on a log axis: median and inter-quartile band per model."""
    if not per_model:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, f5 in per_model.items():
        i = np.asarray(f5["i"])
        ax.plot(i, f5["median"], label=model)
        ax.fill_between(i, f5["q25"], f5["q75"], alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("i (point (i/m) x on the path)")
    ax.set_ylabel("||grad f((i/m) x)||_2")
    m = len(next(iter(per_model.values()))["i"])
    title = f"Figure 5 ({dtype}): ||grad f((i/{m}) x)|| along the IG path, median and IQR over images"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title})
    plt.close(fig)
    return path
