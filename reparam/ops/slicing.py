"""Removing channels (G1): rows and columns of kernels, entries of biases and norm statistics.

Grouped convolutions constrain what can be removed: a channel set keeps the layer a grouped conv
when it keeps the same number of channels in every group, or keeps whole groups (then the
matching channels on the other side of those groups go too, and the layer's groups shrink;
depthwise layers are always in this case). Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._array import Array, index_array, namespace
from .errors import MergeError
from .norm import NormStats

__all__ = ["select_axes", "select_out", "select_in", "select_norm", "matching_group_channels"]


def select_axes(x: Array, keep: Sequence[Sequence[int] | None]) -> Array:
    """``x`` with only the entries ``keep[d]`` (sorted indices) left along each axis ``d``; ``None`` (or
    an axis past the end of ``keep``) leaves an axis whole. The generic form of every selection here,
    for tensors of any rank (what channel surgery applies to every parameter and buffer of a group)."""
    xp = namespace(x)
    for axis, ks in enumerate(keep):
        if ks is not None and len(ks) != x.shape[axis]:
            x = xp.take(x, index_array([int(k) for k in ks], x), axis=axis)
    return x


def _normalise(keep: Sequence[int], total: int, what: str) -> list[int]:
    ks = sorted({int(k) for k in keep})
    if not ks:
        raise MergeError(f"{what}: at least one channel must be kept")
    if ks[0] < 0 or ks[-1] >= total:
        raise MergeError(f"{what}: channel indices {ks} out of range for {total} channels")
    return ks


def _counts(keep: list[int], total: int, groups: int, what: str) -> tuple[list[int], bool]:
    """Per-group counts of `keep` and whether it is a whole-group selection (else equal counts)."""
    if total % groups:
        raise MergeError(f"{what}: {total} channels are not divisible by groups={groups}")
    block = total // groups
    counts = [0] * groups
    for k in keep:
        counts[k // block] += 1
    if len(set(counts)) == 1:
        return counts, False
    if all(c in (0, block) for c in counts):
        return counts, True
    raise MergeError(
        f"{what}: keeping {counts} channels per group of a groups={groups} conv leaves no grouped conv; keep the "
        "same number of channels in every group, or whole groups"
    )


def _select_global(kernel: Array, keep: list[int], groups: int, what: str) -> tuple[Array, int]:
    """Select axis-0 channels (grouped in consecutive blocks); returns the kernel and its new groups."""
    xp = namespace(kernel)
    counts, whole = _counts(keep, kernel.shape[0], groups, what)
    new_groups = sum(1 for c in counts if c) if whole else groups
    return xp.take(kernel, index_array(keep, kernel), axis=0), new_groups


def _select_local(kernel: Array, keep: list[int], groups: int, what: str) -> tuple[Array, int]:
    """Select axis-1 channels, which are local to each group: global index ``j·n + c`` with ``n = shape[1]``."""
    xp = namespace(kernel)
    n = kernel.shape[1]
    counts, whole = _counts(keep, n * groups, groups, what)
    rows = kernel.shape[0] // groups
    shape = tuple(kernel.shape)
    kg = xp.reshape(kernel, (groups, rows) + shape[1:])
    if whole:
        kept = [j for j, c in enumerate(counts) if c]
        out = xp.take(kg, index_array(kept, kernel), axis=0)
        return xp.reshape(out, (len(kept) * rows,) + shape[1:]), len(kept)
    parts = []
    for j in range(groups):
        local = [k - j * n for k in keep if k // n == j]
        parts.append(xp.take(kg[j, ...], index_array(local, kernel), axis=1))
    return xp.concat(parts, axis=0), groups


def select_out(
    kernel: Array, bias: Array | None, keep: Sequence[int], *, transposed: bool = False, groups: int = 1
) -> tuple[Array, Array | None, int]:
    """Keep output channels `keep` (sorted; order preserved) of a conv (``W[keep]``), transposed conv
    (``W[:, keep]`` per group) or linear; ``b[keep]``. Returns ``(kernel, bias, groups)``; groups shrink
    when whole groups are dropped (then drop those groups' input channels upstream, see
    `matching_group_channels`)."""
    total = kernel.shape[1] * groups if transposed else kernel.shape[0]
    ks = _normalise(keep, total, "select_out")
    if transposed:
        kernel, new_groups = _select_local(kernel, ks, groups, "select_out")
    else:
        kernel, new_groups = _select_global(kernel, ks, groups, "select_out")
    if bias is not None:
        bias = select_axes(bias, [ks])
    return kernel, bias, new_groups


def select_in(kernel: Array, keep: Sequence[int], groups: int = 1, transposed: bool = False) -> tuple[Array, int]:
    """Keep input channels `keep` (sorted) of a conv (columns ``W[:, keep]`` per group), transposed
    conv (``W[keep]``) or linear. Returns ``(kernel, groups)``. When whole groups are dropped the
    output channels of those groups go too (their rows are removed from the kernel; remove them
    from the bias and the consumers as well, see `matching_group_channels`)."""
    total = kernel.shape[0] if transposed else kernel.shape[1] * groups
    ks = _normalise(keep, total, "select_in")
    if transposed:
        return _select_global(kernel, ks, groups, "select_in")
    return _select_local(kernel, ks, groups, "select_in")


def matching_group_channels(keep: Sequence[int], total: int, other_total: int, groups: int) -> list[int]:
    """For a whole-group selection `keep` of one side (`total` channels) of a grouped conv, the
    channels of the other side (`other_total` channels) that belong to the kept groups."""
    block, other = total // groups, other_total // groups
    kept = sorted({int(k) // block for k in keep})
    return [j * other + c for j in kept for c in range(other)]


def select_norm(stats: NormStats, keep: Sequence[int]) -> NormStats:
    """Keep channels `keep` (sorted) of a norm's statistics and affine."""
    ks = _normalise(keep, stats.num_features, "select_norm")
    return stats.map(lambda v: select_axes(v, [ks]))
