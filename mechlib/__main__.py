"""``python -m mechlib``: see :mod:`mechlib.cli`."""

import sys

from mechlib.cli import main

sys.exit(main())
