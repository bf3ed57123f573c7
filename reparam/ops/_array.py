"""Tiny helpers over the array API so that every algebra function serves numpy and torch alike.

Torch inputs stay torch tensors (same dtype, device and autograd graph); nothing goes through numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, device

__all__ = ["Array", "namespace", "device_of", "zeros_like_dtype", "bias_or_zeros", "channel_view", "index_array"]

Array = Any  # a numpy ndarray or a torch.Tensor


def namespace(*xs: Array | None) -> Any:
    """The array namespace shared by the non-None arrays `xs`."""
    present = [x for x in xs if x is not None]
    if not present:
        raise TypeError("namespace() needs at least one array")
    return array_namespace(*present)


def device_of(x: Array) -> Any:
    """The device of `x` (``"cpu"`` for numpy)."""
    return device(x)


def zeros_like_dtype(shape: Sequence[int], like: Array) -> Array:
    """Zeros of `shape` with the namespace, dtype and device of `like`."""
    xp = namespace(like)
    return xp.zeros(tuple(shape), dtype=like.dtype, device=device(like))


def bias_or_zeros(bias: Array | None, channels: int, like: Array) -> Array:
    """`bias`, or a zero bias of `channels` entries shaped after `like` when `bias` is None."""
    return zeros_like_dtype((channels,), like) if bias is None else bias


def channel_view(v: Array, ndim: int, axis: int = 0) -> Array:
    """Reshape a per-channel vector so that it broadcasts along `axis` of an `ndim`-rank array."""
    xp = namespace(v)
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def index_array(indices: Sequence[int], like: Array) -> Array:
    """An integer index array on the device of `like` (for `take`)."""
    xp = namespace(like)
    return xp.asarray([int(i) for i in indices], dtype=xp.int64, device=device(like))
