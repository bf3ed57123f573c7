"""Sequential composition of convolutions and linear layers (C1–C6).

Two convolutions in a row are one convolution: with ``y = conv2(conv1(x))`` the merged kernel is
``K[o, i, s1·d2·u + d1·a] = Σ_m W2[o, m, u]·W1[m, i, a]`` (stride ``s1·s2``), and a constant
``b1`` passes through conv2 as ``Σ_{m,u} W2[o, m, u]·b1[m]``. Groups compose block-diagonally
into ``gcd(g1, g2)`` groups.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from ._array import Array, namespace, place_taps, zeros_like_dtype
from .concat import ungroup_kernel
from .errors import MergeError
from .geometry import ConvGeometry
from .norm import NormStats, bn_scale_shift, shift_to_bias

__all__ = [
    "compose",
    "compose_1x1_kxk",
    "compose_kxk_1x1",
    "compose_linear",
    "compose_depthwise_pointwise",
    "composed_groups",
    "pad_value_for_1x1_bias",
]


def composed_groups(groups1: int, groups2: int) -> int:
    """Groups of a `groups1`-grouped conv followed by a `groups2`-grouped one: ``gcd(g1, g2)``."""
    return math.gcd(groups1, groups2)


def _merged_spacing(
    k1: Sequence[int], d1: Sequence[int], s1: Sequence[int], k2: Sequence[int], d2: Sequence[int]
) -> tuple[int, ...]:
    """Per dim, the gcd of the tap steps ``d1`` (if k1 > 1) and ``s1·d2`` (if k2 > 1): the merged dilation."""
    out = []
    for a, da, sa, b, db in zip(k1, d1, s1, k2, d2):
        steps = ([da] if a > 1 else []) + ([sa * db] if b > 1 else [])
        out.append(math.gcd(*steps) if steps else 1)
    return tuple(out)


def _compose_kernels(
    k1: Array,
    groups1: int,
    k2: Array,
    groups2: int,
    stride1: Sequence[int],
    dilation1: Sequence[int],
    dilation2: Sequence[int],
) -> tuple[Array, tuple[int, ...]]:
    """Merged kernel of conv1 then conv2 (no padding considered) and its dilation:
    ``K[o, i, s1·d2·u + d1·a] = Σ_m W2[o, m, u]·W1[m, i, a]``, then thinned to the merged dilation."""
    xp = namespace(k1, k2)
    m = k1.shape[0]
    if k2.shape[1] * groups2 != m:
        raise MergeError(f"compose: the first conv has {m} outputs but the second reads {k2.shape[1] * groups2}")
    if k1.ndim != k2.ndim:
        raise MergeError(f"compose: kernels of rank {k1.ndim} and {k2.ndim} do not compose")
    g = composed_groups(groups1, groups2)
    w1 = ungroup_kernel(k1, groups1, g)  # (M, I/g, k1…)
    w2 = ungroup_kernel(k2, groups2, g)  # (O, M/g, k2…)
    o, ig = w2.shape[0], w1.shape[1]
    sp1, sp2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    fine = tuple(
        d1 * (a - 1) + s1 * d2 * (b - 1) + 1 for a, b, s1, d1, d2 in zip(sp1, sp2, stride1, dilation1, dilation2)
    )
    w1g = xp.reshape(w1, (g, m // g, ig * math.prod(sp1)))
    w2g = xp.reshape(w2, (g, o // g, m // g) + sp2)
    out = zeros_like_dtype((o, ig) + fine, k1)
    for u in itertools.product(*[range(b) for b in sp2]):
        part = xp.reshape(xp.matmul(w2g[(slice(None),) * 3 + u], w1g), (o, ig) + sp1)
        offsets = tuple(s1 * d2 * ui for ui, s1, d2 in zip(u, stride1, dilation2))
        out = out + place_taps(part, fine, offsets, dilation1)
    spacing = _merged_spacing(sp1, dilation1, stride1, sp2, dilation2)
    if any(sp > 1 for sp in spacing):
        out = out[(slice(None), slice(None)) + tuple(slice(None, None, sp) for sp in spacing)]
    return out, spacing


def _is_zero(b: Array | None) -> bool:
    return b is None or bool(namespace(b).all(b == 0))


def compose(
    k1: Array, b1: Array | None, g1: ConvGeometry, k2: Array, b2: Array | None, g2: ConvGeometry
) -> tuple[Array, Array | None, ConvGeometry]:
    """C3, conv1 (`g1`) followed by conv2 (`g2`) as one conv: stride ``s1·s2``, extent
    ``d1(k1−1) + s1·d2(k2−1) + 1``, bias ``b2 + Σ_{m,u} W2[o,m,u]·b1[m]``, groups ``gcd(g1, g2)``.

    Exact when conv2 reads no padding (merged padding ``p1 + s1·p2``, p2 ≤ 0 crops), or when conv1
    is an unpadded stride-1 1x1 and conv2 pads with reflect/replicate/circular (pointwise maps
    commute with those), or zero-pads while ``b1 = 0`` (the padding moves onto the input).
    Otherwise the padded border of the intermediate is not what the merged conv would compute:
    raises MergeError.
    """
    if g1.transposed or g2.transposed:
        raise MergeError("compose: transposed convolutions are not supported")
    if g1.ndim != g2.ndim:
        raise MergeError(f"compose: a {g1.ndim}d conv does not compose with a {g2.ndim}d conv")
    if tuple(k1.shape[2:]) != g1.kernel_size or tuple(k2.shape[2:]) != g2.kernel_size:
        raise MergeError("compose: kernel shapes disagree with their geometries")
    one_by_one = (
        all(k == 1 for k in g1.kernel_size)
        and all(s == 1 for s in g1.stride)
        and all(b == 0 and a == 0 for b, a in g1.padding)
    )
    if not g2.pads:
        kernel, spacing = _compose_kernels(k1, g1.groups, k2, g2.groups, g1.stride, g1.dilation, g2.dilation)
        s1 = g1.stride
        padding = tuple((pb + s * qb, pa + s * qa) for (pb, pa), (qb, qa), s in zip(g1.padding, g2.padding, s1))
        mode = g1.padding_mode
    elif one_by_one and (g2.padding_mode != "zeros" or _is_zero(b1)):
        kernel, spacing = _compose_kernels(k1, g1.groups, k2, g2.groups, g1.stride, g1.dilation, g2.dilation)
        padding, mode = g2.padding, g2.padding_mode
    elif one_by_one:
        raise MergeError(
            "compose: the second conv zero-pads the first conv's output, whose bias is not zero, so the merged conv "
            "would see the bias at the border where the original sees zeros. Fix: pad the intermediate with the "
            "first conv's bias (pad_value_for_1x1_bias, as a BN-and-pad layer does), or move the padding onto the "
            "1x1 conv (second conv padding=0), or use a reflect/replicate/circular padding_mode"
        )
    else:
        raise MergeError(
            f"compose: the second conv pads {g2.padding} ({g2.padding_mode}) the output of a conv with kernel "
            f"{g1.kernel_size}, stride {g1.stride}, padding {g1.padding}; the first conv's values beyond the border "
            "are not a constant, so no single conv reproduces the border. Fix: put all padding before the first "
            "conv (first padding p1 + s1·p2, second padding 0)"
        )
    bias = _bias_through(k2, b1, b2, g2.groups)
    geometry = ConvGeometry(
        kernel_size=tuple(kernel.shape[2:]),
        stride=tuple(a * b for a, b in zip(g1.stride, g2.stride)),
        dilation=spacing,
        padding=padding,
        groups=composed_groups(g1.groups, g2.groups),
        padding_mode=mode,
    )
    return kernel, bias, geometry


def _bias_through(k2: Array, b1: Array | None, b2: Array | None, groups2: int) -> Array | None:
    bias = None if b1 is None else shift_to_bias(k2, b1, groups2)
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    return bias


def compose_1x1_kxk(
    k1: Array, b1: Array | None, k2: Array, b2: Array | None, groups1: int = 1, groups2: int = 1
) -> tuple[Array, Array | None]:
    """C1 algebra, 1x1 conv (stride 1) then kxk conv: ``K[o, c, u] = Σ_m W2[o, m, u]·W1[m, c]``,
    ``b = b2 + Σ_{m,u} W2[o, m, u]·b1[m]``; groups ``gcd(groups1, groups2)``; geometry = the kxk's.

    Exact only when the kxk does not zero-pad a non-zero ``b1`` — i.e. the intermediate is padded
    with `pad_value_for_1x1_bias` (BN-and-pad), or the kxk uses a non-zero padding mode or
    padding 0. `compose` checks this from geometries."""
    if any(k != 1 for k in k1.shape[2:]):
        raise MergeError(f"compose_1x1_kxk: the first kernel has spatial size {tuple(k1.shape[2:])}, not 1x1")
    n = k2.ndim - 2
    kernel, _ = _compose_kernels(k1, groups1, k2, groups2, (1,) * n, (1,) * n, (1,) * n)
    return kernel, _bias_through(k2, b1, b2, groups2)


def compose_kxk_1x1(
    k1: Array, b1: Array | None, k2: Array, b2: Array | None, groups1: int = 1, groups2: int = 1
) -> tuple[Array, Array | None]:
    """C2, kxk conv then 1x1 conv (stride 1, no padding): ``K[o, i, u] = Σ_m W2[o, m]·W1[m, i, u]``,
    ``b = W2·b1 + b2``; always exact; geometry = the kxk's with groups ``gcd(groups1, groups2)``
    (a grouped kxk and a dense 1x1 give a dense conv). Also the ResRep compactor fold (C6)."""
    if any(k != 1 for k in k2.shape[2:]):
        raise MergeError(f"compose_kxk_1x1: the second kernel has spatial size {tuple(k2.shape[2:])}, not 1x1")
    n = k1.ndim - 2
    kernel, _ = _compose_kernels(k1, groups1, k2, groups2, (1,) * n, (1,) * n, (1,) * n)
    return kernel, _bias_through(k2, b1, b2, groups2)


def compose_depthwise_pointwise(
    dw_kernel: Array,
    dw_bias: Array | None,
    pw_kernel: Array,
    pw_bias: Array | None,
    dw_groups: int,
    pw_groups: int = 1,
) -> tuple[Array, Array | None]:
    """C5, depthwise conv (``C·E × 1 × k…``, groups C, multiplier E) then pointwise conv: one conv
    ``K[o, c, u] = Σ_e P[o, c·E+e]·D[c·E+e, 0, u]`` with groups ``gcd(C, pw_groups)``."""
    if dw_kernel.shape[1] != 1:
        raise MergeError(f"compose_depthwise_pointwise: kernel {tuple(dw_kernel.shape)} is not depthwise (I/g = 1)")
    return compose_kxk_1x1(dw_kernel, dw_bias, pw_kernel, pw_bias, dw_groups, pw_groups)


def compose_linear(w1: Array, b1: Array | None, w2: Array, b2: Array | None) -> tuple[Array, Array | None]:
    """C4, ``W2(W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)``."""
    xp = namespace(w1, w2)
    if w2.shape[1] != w1.shape[0]:
        raise MergeError(f"compose_linear: the first layer has {w1.shape[0]} outputs, the second reads {w2.shape[1]}")
    bias = None if b1 is None else xp.matmul(w2, b1)
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    return xp.matmul(w2, w1), bias


def pad_value_for_1x1_bias(bias: Array | None, stats: NormStats | None = None) -> Array:
    """C1 fix (a): the per-channel constant a 1x1 conv (bias `bias`) followed by an optional BN
    outputs on a zero input, ``s·b + t`` (``b`` if no BN). Padding the intermediate with it makes
    ``1x1 → pad(value) → kxk(padding 0)`` equal ``pad(0) → merged conv``."""
    if stats is None:
        if bias is None:
            raise ValueError("pad_value_for_1x1_bias needs a bias or BN statistics")
        return bias
    s, t = bn_scale_shift(stats)
    return t if bias is None else s * bias + t
