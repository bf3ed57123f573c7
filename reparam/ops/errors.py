"""The one error type of the kernel algebra."""

from __future__ import annotations

__all__ = ["MergeError"]


class MergeError(ValueError):
    """A merge was asked for that would not be exact.

    The message names the layer or operation, says why the result would differ from the
    unmerged computation, and what to change so that it becomes exact.
    """
