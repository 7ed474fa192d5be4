"""Reproduce the paper's Tables 1-4 and Figures 4-5: ``python evaluate.py [--models ...] [--out DIR]``.

This file is intentionally kept short: the logic is in jaxrecover.protocol, the CLI in jaxrecover.cli
(also installed as ``jaxrecover-evaluate``). ``python evaluate.py --help`` lists the options.
"""

import os
import sys

from jaxrecover.cli import evaluate_main

if __name__ == "__main__":
    code = evaluate_main()
    if code == 130:  # interrupted: leave without interpreter teardown, which can crash while XLA threads run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
