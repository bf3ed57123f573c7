"""Command line: ``python -m apps.sfp {train,prune,eval,export,demo}`` (also installed as ``sfp``).

The commands are the shared ones of `apps.engine.commands` (see there); ``prune`` takes one flag per
field of `SFPConfig` (``--method sfp|cr-sfp``, ``--prune-ratio``, ``--criterion`` …) besides
`DataConfig`, `ModelConfig` and `TrainConfig`; CR-SFP trains on two augmented views of every image.
"""

from __future__ import annotations

import sys

from ..engine.commands import entry_points
from .app import APP

__all__ = ["build_parser", "main"]

build_parser, main = entry_points(APP)

if __name__ == "__main__":
    sys.exit(main())
