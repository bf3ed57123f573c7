"""Command line: ``python -m apps.resrep {train,prune,eval,export,demo}`` (also installed as ``resrep``).

The commands are the shared ones of `apps.engine.commands` (see there); ``prune`` takes one flag per
field of `ResRepConfig` (``--flops-target`` is ``ResRepConfig.flops_target``) besides `DataConfig`,
`ModelConfig` and `TrainConfig`, and fails loudly (exit status 2, by how much, what to change) when the
run ends above its MACs target.
"""

from __future__ import annotations

import sys

from ..engine.commands import entry_points
from .app import APP

__all__ = ["build_parser", "main"]

build_parser, main = entry_points(APP)

if __name__ == "__main__":
    sys.exit(main())
