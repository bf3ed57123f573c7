"""``python -m apps.csgd``."""

import sys

from .cli import main

sys.exit(main())
