"""Parallel branches summed into one convolution (B1–B4) and special operators as kernels (D1, D2, D5).

A branch is the affine map ``x ↦ conv(x; W, geometry) + b``; branches with the same stride,
groups and padding mode whose taps read the same input positions add kernel-wise once each is
placed on a common tap grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._array import Array, device_of, namespace, place_taps
from .errors import MergeError
from .geometry import ConvGeometry

__all__ = [
    "add_branches",
    "embed_kernel",
    "embed_offset",
    "dilate_kernel",
    "identity_kernel",
    "avg_pool_kernel",
    "dirac_plus",
]


def add_branches(*pairs: tuple[Array, Array | None]) -> tuple[Array, Array | None]:
    """B1, ``W = Σ_j W_j``, ``b = Σ_j b_j`` (None counts as zero; all None gives None).
    Kernels must already share one shape (embed them first)."""
    if not pairs:
        raise ValueError("add_branches needs at least one (kernel, bias) pair")
    shape = tuple(pairs[0][0].shape)
    for k, _ in pairs[1:]:
        if tuple(k.shape) != shape:
            raise MergeError(
                f"add_branches: kernel shapes differ ({shape} vs {tuple(k.shape)}); "
                "embed the smaller kernel into the larger geometry first (embed_kernel)"
            )
    kernel = pairs[0][0]
    for k, _ in pairs[1:]:
        kernel = kernel + k
    biases = [b for _, b in pairs if b is not None]
    if not biases:
        return kernel, None
    bias = biases[0]
    for b in biases[1:]:
        bias = bias + b
    return kernel, bias


def dilate_kernel(kernel: Array, rate: Sequence[int]) -> Array:
    """B4, a kernel with dilation ``r`` as a dense kernel of size ``r(k−1)+1`` (dilation 1):
    ``W'[…, r·u] = W[…, u]``, zero elsewhere."""
    rate = tuple(int(r) for r in rate)
    spatial = tuple(kernel.shape[2:])
    if len(rate) != len(spatial) or min(rate) < 1:
        raise ValueError(f"dilate_kernel: rate {rate} does not fit a kernel with spatial shape {spatial}")
    if all(r == 1 for r in rate):
        return kernel
    return place_taps(kernel, tuple(r * (k - 1) + 1 for k, r in zip(spatial, rate)), (0,) * len(rate), rate)


def embed_offset(src: ConvGeometry, dst: ConvGeometry, src_kernel_size: Sequence[int] | None = None) -> tuple[int, ...]:
    """The tap offset at which a `src` kernel (already on `dst`'s dilation grid, spatial size
    `src_kernel_size`) sits inside the `dst` kernel: ``o = (P_before − p_before)/d``, which must be an
    integer in ``[0, K − k]`` with the after side agreeing, ``(P_after − p_after)/d = K − k − o``."""
    ks = tuple(src_kernel_size or src.kernel_size)
    offs = []
    for i, (k, kk, (pb, pa), (qb, qa), d) in enumerate(
        zip(ks, dst.kernel_size, src.padding, dst.padding, dst.dilation)
    ):
        before, after = qb - pb, qa - pa
        if before % d or after % d or before < 0 or after < 0 or before // d + after // d != kk - k:
            raise MergeError(
                f"embed_kernel: in spatial dim {i} a size-{k} kernel padded {(pb, pa)} does not align with the "
                f"size-{kk} target padded {(qb, qa)} at dilation {d}: the offset (P_before - p_before)/d = {before}/{d} "
                f"must be an integer in [0, {kk - k}] and the after side must agree ({after}/{d} = {kk - k} - offset). "
                f"Change the branch padding to ({qb - d * ((kk - k) // 2)}, {qa - d * (kk - k - (kk - k) // 2)}) "
                "or the kernel sizes"
            )
        offs.append(before // d)
    return tuple(offs)


def embed_kernel(kernel: Array, src: ConvGeometry, dst: ConvGeometry) -> Array:
    """B2, place a branch kernel of geometry `src` into `dst`'s kernel_size so that both read the
    same inputs: a tap ``v`` of the branch lands on ``u = v + (P − p)/d`` (per dim, see
    `embed_offset`). A branch dilation ``r`` that is a multiple of ``d`` is densified first (B4).
    Stride and groups must match, and padding_mode too when the branch reads padding (any mode
    works once the taps align; a branch that reads no padding never sees the target's mode)."""
    for field in ("ndim", "stride", "groups") + (("padding_mode",) if src.pads else ()):
        if getattr(src, field) != getattr(dst, field):
            raise MergeError(
                f"embed_kernel: branch {field}={getattr(src, field)!r} differs from target "
                f"{field}={getattr(dst, field)!r}; branches must share it to be summed"
            )
    if src.transposed or dst.transposed:
        raise MergeError("embed_kernel: transposed convolutions are not supported")
    rates = []
    for i, (k, r, d) in enumerate(zip(src.kernel_size, src.dilation, dst.dilation)):
        if k == 1:
            rates.append(1)
        elif r % d:
            raise MergeError(
                f"embed_kernel: branch dilation {r} in dim {i} is not a multiple of the target dilation {d}; "
                "no kernel on the target's tap grid reads the branch's inputs"
            )
        else:
            rates.append(r // d)
    kernel = dilate_kernel(kernel, rates)
    ks = tuple(kernel.shape[2:])
    offsets = embed_offset(src, dst, ks)
    if ks == tuple(dst.kernel_size):
        return kernel
    return place_taps(kernel, dst.kernel_size, offsets)


def _group_eye(channels: int, groups: int, like: Array) -> Array:
    """``(C, C/g)`` matrix with ``Id[o, o mod (C/g)] = 1``: the identity of a g-grouped 1x1 conv."""
    if groups < 1 or channels % groups:
        raise MergeError(f"groups={groups} does not divide channels={channels}")
    xp = namespace(like)
    n = channels // groups
    eye = xp.eye(n, dtype=like.dtype, device=device_of(like))
    return xp.concat([eye] * groups, axis=0)


def _place_at_tap(mat: Array, kernel_size: Sequence[int], tap: Sequence[int], like: Array) -> Array:
    xp = namespace(like)
    return place_taps(xp.reshape(mat, tuple(mat.shape) + (1,) * len(kernel_size)), kernel_size, tap)


def identity_kernel(channels: int, groups: int, geometry: ConvGeometry, *, like: Array) -> Array:
    """D1, the kernel of `geometry` that maps ``x`` to ``x`` (stride s: to ``x[..., ::s]``):
    ``Id[o, o mod (C/g), u*] = 1`` at the tap ``u* = P_before/d`` that reads input ``s·i``.
    Requires ``u*`` integral in ``[0, K−1]`` and ``P_after = d(K−1−u*)`` (same output size)."""
    if geometry.transposed:
        raise MergeError("identity_kernel: transposed convolutions are not supported")
    tap = []
    for i, (k, d, (pb, pa)) in enumerate(zip(geometry.kernel_size, geometry.dilation, geometry.padding)):
        u = identity_tap(k, d, (pb, pa))
        if u is None:
            raise MergeError(
                f"identity_kernel: in spatial dim {i} no tap of a size-{k} kernel at dilation {d} padded {(pb, pa)} "
                f"reads the output position's own input: need padding before = d·u for a tap u and before + after = "
                f"d(k-1) = {d * (k - 1)}; use padding ({d * ((k - 1) // 2)}, {d * (k - 1 - (k - 1) // 2)})"
            )
        tap.append(u)
    return _place_at_tap(_group_eye(channels, groups, like), geometry.kernel_size, tap, like)


def identity_tap(kernel: int, dilation: int, padding: tuple[int, int]) -> int | None:
    """In one spatial dim, the tap ``u`` of a size-`kernel` kernel at `dilation` that reads the output
    position's own input under `padding` ``(P_before, P_after)``: ``P_before = d·u`` and
    ``P_after = d·(K−1−u)`` (same output size); None when there is none."""
    before, after = padding
    if before % dilation or not 0 <= before // dilation < kernel or after != dilation * (kernel - 1) - before:
        return None
    return before // dilation


def avg_pool_kernel(channels: int, groups: int, kernel_size: Sequence[int], *, like: Array) -> Array:
    """D2, average pooling as a conv kernel: ``W[o, o mod (C/g), …] = 1/∏k`` (use the pool's
    stride and padding; exact with ``count_include_pad=True``, see `reparam.ops.modules.check_avg_pool_mergeable`)."""
    xp = namespace(like)
    kernel_size = tuple(int(k) for k in kernel_size)
    eye = _group_eye(channels, groups, like) / math.prod(kernel_size)
    ones = xp.ones(kernel_size, dtype=like.dtype, device=device_of(like))
    return xp.reshape(eye, tuple(eye.shape) + (1,) * len(kernel_size)) * ones


def dirac_plus(kernel: Array, groups: int = 1) -> Array:
    """D5, identity-based conv: the effective kernel ``W + Id`` of a conv that adds its input
    (``Id[o, o mod (C/g)]`` at the centre; needs ``O = I`` and odd kernel sizes; all 1 for a 1x1)."""
    o, i = kernel.shape[0], kernel.shape[1] * groups
    spatial = tuple(kernel.shape[2:])
    if o != i:
        raise MergeError(f"dirac_plus: an identity needs as many outputs as inputs, got {o} outputs and {i} inputs")
    if any(k % 2 == 0 for k in spatial):
        raise MergeError(
            f"dirac_plus: kernel {spatial} has no centre tap; use identity_kernel with the conv's geometry"
        )
    return kernel + _place_at_tap(_group_eye(o, groups, kernel), spatial, [k // 2 for k in spatial], kernel)
