"""Tiny helpers over the array API so that every algebra function serves numpy and torch alike.

Torch inputs stay torch tensors (same dtype, device and autograd graph); nothing goes through numpy.
Only calls of the array API standard are used, and no array is written in place (jax arrays are
immutable): kernels are assembled with `concat`, `stack` and `reshape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from array_api_compat import array_namespace, device

__all__ = [
    "Array",
    "bias_or_zeros",
    "channel_view",
    "device_of",
    "index_array",
    "namespace",
    "place_taps",
    "zeros_like_dtype",
]


class Array(Protocol):
    """What the algebra needs of an array: an array-API array (numpy, torch, jax.numpy, array-api-strict …).
    The algebra reaches everything else through the array's namespace (`namespace`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    def __getitem__(self, key: Any, /) -> Array: ...

    def __add__(self, other: Any, /) -> Array: ...

    def __sub__(self, other: Any, /) -> Array: ...

    def __mul__(self, other: Any, /) -> Array: ...

    def __truediv__(self, other: Any, /) -> Array: ...

    def __neg__(self) -> Array: ...


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


def _pad_axis(x: Array, axis: int, before: int, after: int) -> Array:
    """`x` with `before` / `after` zeros concatenated along `axis`."""
    if before == 0 and after == 0:
        return x
    xp = namespace(x)
    parts = []
    for n in (before, after):
        shape = list(x.shape)
        shape[axis] = n
        parts.append(zeros_like_dtype(shape, x))
    return xp.concat([parts[0], x, parts[1]], axis=axis)


def _spread_axis(x: Array, axis: int, step: int) -> Array:
    """`x` with ``step − 1`` zeros between neighbouring entries along `axis` (length ``step·(n−1)+1``)."""
    if step == 1:
        return x
    xp = namespace(x)
    n = x.shape[axis]
    spread = xp.stack([x] + [zeros_like_dtype(x.shape, x)] * (step - 1), axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = n * step
    full = xp.reshape(spread, tuple(shape))
    return xp.take(full, index_array(range(step * (n - 1) + 1), full), axis=axis)


def place_taps(x: Array, size: Sequence[int], offsets: Sequence[int], steps: Sequence[int] | None = None) -> Array:
    """Zeros of trailing (spatial) shape `size` holding the taps of `x`: tap ``u`` of `x` lands on
    ``offset + step·u`` per trailing dim; the leading dims of `x` are kept. The functional form of
    ``out[..., o::s] = x``, so it runs on immutable arrays too."""
    n = len(size)
    steps = (1,) * n if steps is None else tuple(steps)
    lead = x.ndim - n
    for i, (total, o, st) in enumerate(zip(size, offsets, steps)):
        axis = lead + i
        x = _spread_axis(x, axis, int(st))
        after = int(total) - int(o) - x.shape[axis]
        if o < 0 or after < 0:
            raise ValueError(f"place_taps: {x.shape[axis]} taps at offset {o} do not fit size {total} in dim {i}")
        x = _pad_axis(x, axis, int(o), after)
    return x
