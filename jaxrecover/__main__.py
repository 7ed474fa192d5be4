"""``python -m jaxrecover COMMAND ...`` (the ``jaxrecover`` console script)."""

import sys

from .cli import main

sys.exit(main())
