"""Concatenation along channels (E1, E2) and the block-diagonal view of grouped kernels."""

from __future__ import annotations

from collections.abc import Sequence

from ._array import Array, bias_or_zeros, namespace, zeros_like_dtype
from .errors import MergeError

__all__ = ["concat_out", "split_in", "ungroup_kernel"]


def concat_out(*pairs: tuple[Array, Array | None], groups: int = 1) -> tuple[Array, Array | None]:
    """E1, convs of one geometry on the same input, outputs concatenated: stack rows,
    ``W = cat_j W_j``, ``b = cat_j b_j`` (a None bias is zero; all None gives None).

    Grouped convs (``groups`` > 1) cannot stay one grouped conv in the concatenation's channel order
    (each kernel's rows belong to every group): their kernels are first written densely
    (`ungroup_kernel`), so the result is a groups=1 kernel."""
    if not pairs:
        raise ValueError("concat_out needs at least one (kernel, bias) pair")
    if groups > 1:
        pairs = tuple((ungroup_kernel(k, groups, 1), b) for k, b in pairs)
    tail = tuple(pairs[0][0].shape[1:])
    for k, _ in pairs[1:]:
        if tuple(k.shape[1:]) != tail:
            raise MergeError(
                f"concat_out: kernels {tail} and {tuple(k.shape[1:])} differ beyond the output axis; "
                "concatenated convs must share input channels, groups and kernel size"
            )
    xp = namespace(*[k for k, _ in pairs])
    kernel = xp.concat([k for k, _ in pairs], axis=0)
    if all(b is None for _, b in pairs):
        return kernel, None
    return kernel, xp.concat([bias_or_zeros(b, k.shape[0], k) for k, b in pairs], axis=0)


def ungroup_kernel(kernel: Array, groups: int, new_groups: int = 1) -> Array:
    """The same conv written with fewer groups (`new_groups` dividing `groups`): each new group's
    kernel ``O/G × I/G`` is block-diagonal in the ``g/G`` old groups it holds (zeros elsewhere)."""
    if groups % new_groups:
        raise MergeError(f"ungroup_kernel: new groups {new_groups} must divide groups {groups}")
    if groups == new_groups:
        return kernel
    xp = namespace(kernel)
    o, n = kernel.shape[0], kernel.shape[1]
    f = groups // new_groups
    if o % groups:
        raise MergeError(f"ungroup_kernel: {o} output channels are not divisible by groups={groups}")
    spatial = tuple(kernel.shape[2:])
    kg = xp.reshape(kernel, (new_groups, f, o // groups, n) + spatial)
    zero = zeros_like_dtype((new_groups, o // groups, n) + spatial, kernel)
    rows = [xp.stack([kg[:, a, ...] if b == a else zero for b in range(f)], axis=2) for a in range(f)]
    return xp.reshape(xp.stack(rows, axis=1), (o, f * n) + spatial)  # (G, f, O/g, f, I/g, k…): block-diagonal


def split_in(kernel: Array, sizes: Sequence[int], groups: int = 1) -> list[Array]:
    """E2, a conv over ``cat(x_1, …, x_n)`` (channel counts `sizes`) is ``Σ_j conv(x_j; W_j)``
    with ``W_j`` the columns of piece j. A grouped kernel is first written densely (groups=1), so
    every returned piece is a groups=1 kernel ``O × sizes[j] × k…``."""
    sizes = [int(s) for s in sizes]
    dense = ungroup_kernel(kernel, groups, 1)
    if sum(sizes) != dense.shape[1]:
        raise MergeError(f"split_in: sizes {sizes} sum to {sum(sizes)}, the conv reads {dense.shape[1]} input channels")
    pieces, start = [], 0
    for s in sizes:
        pieces.append(dense[:, start : start + s, ...])
        start += s
    return pieces
