"""Train one of the paper's models: ``python train.py --model lenet --out checkpoints/lenet``.

This file is intentionally kept short: the logic is in jaxrecover.training, the CLI in jaxrecover.cli
(also installed as ``jaxrecover-train``).
"""

import os
import sys

from jaxrecover.cli import train_main

if __name__ == "__main__":
    code = train_main()
    if code == 130:  # interrupted: leave without interpreter teardown, which can crash while XLA threads run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
