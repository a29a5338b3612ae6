"""``python -m tools.bench``: see :mod:`tools.bench`."""

import sys

from tools.bench.runner import main

sys.exit(main())
