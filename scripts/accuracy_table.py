"""Print the test-accuracy table of the checkpoints in a directory (used for README).

Usage: python scripts/accuracy_table.py [checkpoints]
"""

import sys
from pathlib import Path

from jaxrecover.checkpoint import load_metadata
from jaxrecover.models import MODEL_NAMES

PAPER = {"twolayer_nobias": 95.77, "twolayer": 95.69, "lenet_nobias": 98.81, "lenet": 98.92, "resnet18": 99.42}


def main(root="checkpoints"):
    print("| model | test acc. (offline MNIST, 2,000 images) | paper (60k/10k) | difference | epochs | train s | command |")
    print("|---|---|---|---|---|---|---|")
    for m in MODEL_NAMES:
        d = Path(root) / m
        try:
            meta = load_metadata(d)
        except Exception as e:  # noqa: BLE001 - report what is missing
            print(f"| {m} | (no checkpoint: {type(e).__name__}) | {PAPER[m]:.2f}% | | | | |")
            continue
        acc = 100 * meta["test_accuracy"]
        print(f"| {m} | {acc:.2f}% | {PAPER[m]:.2f}% | {acc - PAPER[m]:+.2f} | {meta['epochs']} | "
              f"{meta['train_seconds']:.0f} | `python train.py --model {m} --out {root}/{m}` |")


if __name__ == "__main__":
    main(*sys.argv[1:])
