"""Registry of mergeable block classes: `reparam.merge` replaces every instance by its `merged()`."""

from __future__ import annotations

from typing import TypeVar

from reparam.ops.blocks.base import MergeableBlock

BLOCKS: dict[str, type[MergeableBlock]] = {}
"""Class name → block class, for every registered block."""

B = TypeVar("B", bound=type[MergeableBlock])


def register_block(cls: B) -> B:
    """Class decorator: make `reparam.merge` merge instances of `cls` (a `MergeableBlock` subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, MergeableBlock)):
        raise TypeError(f"{cls!r} is not a MergeableBlock subclass")
    known = BLOCKS.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"a different block class is already registered as {cls.__name__!r}: {known!r}")
    BLOCKS[cls.__name__] = cls
    return cls


def is_registered_block(module: object) -> bool:
    """Whether `module` is an instance of a registered block class."""
    return isinstance(module, MergeableBlock) and BLOCKS.get(type(module).__name__) is type(module)
