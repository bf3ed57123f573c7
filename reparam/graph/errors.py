"""Errors raised by `reparam.graph`; both are `ValueError`s that name the op and what to change."""

from __future__ import annotations


class GraphTraceError(ValueError):
    """The model could not be traced or its shapes could not be propagated."""


class PruneError(ValueError):
    """A keep-set breaks a group constraint, or a pruned program would not be exact or would not run."""
