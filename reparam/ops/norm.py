"""Folding normalisation and per-channel affine maps into convolutions and linear layers (A1–A7).

Notation: eval-mode BatchNorm is the per-channel affine ``BN(z) = s·z + t`` with
``s = γ/√(σ²+ε)`` and ``t = β − μ·s``. Kernels are ``O × I/g × k…`` (conv), ``I × O/g × k…``
(transposed conv) or ``O × I`` (linear).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._array import Array, channel_view, namespace
from .errors import MergeError
from .geometry import ConvGeometry

__all__ = [
    "NormStats",
    "bn_scale_shift",
    "fuse_bn",
    "fuse_bn_transposed",
    "fuse_pre_bn",
    "compose_affine",
    "scale_out",
    "scale_in",
    "fold_norm_affine",
    "propagate_bias",
    "shift_to_bias",
]


@dataclass(frozen=True, eq=False)
class NormStats:
    """Eval-mode statistics and affine of a batch norm; `weight`/`bias` None mean 1/0 (affine=False).
    Compared by identity (its fields are arrays)."""

    mean: Array
    var: Array
    weight: Array | None
    bias: Array | None
    eps: float

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    def map(self, fn) -> NormStats:
        """Apply `fn` to every per-channel array (None stays None)."""
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        return NormStats(**{k: (v if k == "eps" or v is None else fn(v)) for k, v in vals.items()})


def bn_scale_shift(stats: NormStats) -> tuple[Array, Array]:
    """``(s, t)`` with ``BN(z) = s·z + t``: ``s = γ/√(σ²+ε)``, ``t = β − μ·s``."""
    xp = namespace(stats.mean, stats.var, stats.weight, stats.bias)
    inv = 1.0 / xp.sqrt(stats.var + stats.eps)
    s = inv if stats.weight is None else stats.weight * inv
    t = -stats.mean * s if stats.bias is None else stats.bias - stats.mean * s
    return s, t


def _check_channels(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise MergeError(f"{what}: the norm has {got} channels but the layer has {expected}")


def scale_out(kernel: Array, bias: Array | None, scale: Array) -> tuple[Array, Array | None]:
    """A5, per-output-channel scale after a conv/linear: ``W' = diag(γ)·W``, ``b' = γ⊙b``."""
    _check_channels("scale_out", scale.shape[0], kernel.shape[0])
    k = kernel * channel_view(scale, kernel.ndim, 0)
    return k, (None if bias is None else bias * scale)


def fuse_bn(kernel: Array, bias: Array | None, stats: NormStats) -> tuple[Array, Array]:
    """A1/A2, conv or linear followed by BN: ``W'[o] = s[o]·W[o]``, ``b' = s⊙b + t``."""
    s, t = bn_scale_shift(stats)
    _check_channels("fuse_bn", s.shape[0], kernel.shape[0])
    k, b = scale_out(kernel, bias, s)
    return k, (t if b is None else b + t)


def _group_axis_view(v: Array, kernel: Array, groups: int, axis: int) -> tuple[Array, Array]:
    """View `kernel` as ``(g, …)`` with the grouped-by-channel `axis` split as ``(g, n)`` and a
    per-channel vector `v` (length ``g·kernel.shape[axis]``) broadcasting against it."""
    xp = namespace(kernel, v)
    shape = tuple(kernel.shape)
    if shape[0] % groups:
        raise MergeError(f"{shape[0]} kernel rows are not divisible by groups={groups}")
    n = shape[axis]
    _check_channels("grouped fold", v.shape[0], groups * n)
    kg = xp.reshape(kernel, (groups, shape[0] // groups) + shape[1:])
    vshape = [groups] + [1] * (len(shape))
    vshape[axis + 1] = n
    return kg, xp.reshape(v, tuple(vshape))


def fuse_bn_transposed(kernel: Array, bias: Array | None, stats: NormStats, groups: int = 1) -> tuple[Array, Array]:
    """A1t, transposed conv (kernel ``I × O/g × k…``) followed by BN: output channel of
    ``W[i, j]`` is ``(i div (I/g))·(O/g) + j``, so ``W'[i, j] = s[(i div (I/g))·(O/g) + j]·W[i, j]``."""
    xp = namespace(kernel)
    s, t = bn_scale_shift(stats)
    kg, sv = _group_axis_view(s, kernel, groups, 1)
    k = xp.reshape(kg * sv, tuple(kernel.shape))
    return k, (t if bias is None else bias * s + t)


def _refuse_padded(geometry: ConvGeometry | None, what: str) -> None:
    if geometry is None:
        return
    if geometry.transposed:
        raise MergeError(
            f"{what}: a constant input shift through a transposed conv is not a per-channel constant "
            "(border outputs receive fewer taps); not representable"
        )
    if geometry.pads and geometry.padding_mode == "zeros":
        raise MergeError(
            f"{what}: the consumer conv zero-pads {geometry.padding}; the padded zeros would not receive the "
            "shift, so the border differs. Use padding=0 (pad before the norm instead) or a "
            "reflect/replicate/circular padding_mode"
        )


def scale_in(kernel: Array, scale: Array, groups: int = 1) -> Array:
    """A5 input side, per-input-channel scale before a conv/linear: ``W'[o, i] = W[o, i]·γ[grp(o)+i]``
    with ``grp(o) = (o div (O/g))·(I/g)``. Exact before any padding (a pure scale maps 0 to 0)."""
    xp = namespace(kernel, scale)
    kg, sv = _group_axis_view(scale, kernel, groups, 1)
    # the channel index of column i in group j is j·(I/g) + i: _group_axis_view gives shape (g, 1, I/g, 1…)
    return xp.reshape(kg * sv, tuple(kernel.shape))


def propagate_bias(kernel: Array, bias: Array | None, shift: Array, geometry: ConvGeometry | None = None) -> Array:
    """A7, a per-input-channel shift before a conv/linear moves into its bias:
    ``b'[o] = b[o] + Σ_{i,u} W[o, i, u]·shift[grp(o)+i]``. `geometry` None means linear.
    Refuses a zero-padding consumer (the padded zeros would not be shifted)."""
    _refuse_padded(geometry, "propagate_bias")
    summed = shift_to_bias(kernel, shift, 1 if geometry is None else geometry.groups)
    return summed if bias is None else bias + summed


def shift_to_bias(kernel: Array, shift: Array, groups: int = 1) -> Array:
    """What a per-input-channel constant `shift` becomes after a conv/linear that reads no
    padding: ``Σ_{i,u} W[o, i, u]·shift[grp(o)+i]`` per output channel."""
    xp = namespace(kernel, shift)
    kg, tv = _group_axis_view(shift, kernel, groups, 1)
    return xp.sum(xp.reshape(kg * tv, (kernel.shape[0], -1)), axis=1)


def fold_norm_affine(
    kernel: Array,
    bias: Array | None,
    norm_weight: Array | None,
    norm_bias: Array | None,
    geometry: ConvGeometry | None = None,
) -> tuple[Array, Array | None]:
    """A6, a norm's elementwise affine ``γn·z + βn`` (or any per-channel affine) absorbed into the
    following conv/linear: ``W' = W·diag(γn)``, ``b' = b + W·βn``. The normalisation itself stays
    (set its affine to identity). `geometry` None means linear; refuses a zero-padding consumer
    when there is a shift."""
    groups = 1 if geometry is None else geometry.groups
    if norm_bias is not None:
        bias = propagate_bias(kernel, bias, norm_bias, geometry)
    if norm_weight is not None:
        if geometry is not None and geometry.transposed:
            raise MergeError("fold_norm_affine: transposed consumers are not supported")
        kernel = scale_in(kernel, norm_weight, groups)
    return kernel, bias


def fuse_pre_bn(
    kernel: Array, bias: Array | None, stats: NormStats, geometry: ConvGeometry | None = None
) -> tuple[Array, Array]:
    """A3, BN before a conv/linear: ``W'[o, i] = W[o, i]·s[grp(o)+i]``,
    ``b' = b + Σ_{i,u} W[o, i, u]·t[grp(o)+i]``. `geometry` None means linear. Exact for a
    consumer without zero padding (padding 0, or reflect/replicate/circular); refused otherwise."""
    _refuse_padded(geometry, "fuse_pre_bn")
    s, t = bn_scale_shift(stats)
    k, b = fold_norm_affine(kernel, bias, s, t, geometry)
    return k, b


def compose_affine(s1: Array, t1: Array, s2: Array, t2: Array) -> tuple[Array, Array]:
    """A4, ``s2·(s1·z + t1) + t2 = (s1·s2)·z + (s2·t1 + t2)``."""
    return s1 * s2, s2 * t1 + t2
