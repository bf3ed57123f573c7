"""Command line: ``python -m apps.csgd {train,prune,eval,export,demo}`` (also installed as ``csgd``).

The commands are the shared ones of `apps.engine.commands` (see there); ``prune`` takes one flag per
field of `CSGDConfig` besides `DataConfig`, `ModelConfig` and `TrainConfig`, and refuses (exit status 2,
with the measured spread) to merge clusters that have not converged.
"""

from __future__ import annotations

import sys

from ..engine.commands import entry_points
from .app import APP

__all__ = ["build_parser", "main"]

build_parser, main = entry_points(APP)

if __name__ == "__main__":
    sys.exit(main())
