"""``python -m apps.resrep {train,prune,eval,export,demo}``."""

import sys

from .cli import main

sys.exit(main())
