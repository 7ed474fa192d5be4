"""Train one of the paper's models: ``python train.py --model lenet --out checkpoints/lenet``.

This file is intentionally kept short: the logic is in jaxrecover.training, the CLI in jaxrecover.cli
(also installed as ``jaxrecover-train``).
"""

import sys

from jaxrecover.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
