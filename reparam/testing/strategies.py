"""Hypothesis strategies for proving merges: conv geometries, norm statistics, small inputs, tensors.

Random tensors come from a drawn seed (fast, shrinks well); geometries cover 1-/2-/3-D kernels (odd,
even, rectangular), anisotropic stride and dilation, per-side padding below, at and above centre,
groups over the common divisors of the channel counts and every padding mode; norm statistics include
tiny variances, exact-zero and negative γ, several ε and affine off; inputs are just large enough for
the geometry, so that borders dominate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st
from torch import nn

from reparam.ops import ConvGeometry, NormStats
from reparam.ops.geometry import PADDING_MODES
from reparam.ops.modules import is_batch_norm

EPSILONS = (1e-5, 1e-3, 0.1)
_BN_STREAM = 1_000_003

__all__ = [
    "EPSILONS",
    "PADDING_MODES",
    "bn_module",
    "bn_stats",
    "conv_geometries",
    "conv_layers",
    "divisors",
    "min_chain_input_size",
    "min_input_size",
    "random_tensor",
    "randomise_norms",
    "small_inputs",
    "tensors",
]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_tensor(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """A standard-normal tensor from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)


def tensors(shape: Sequence[int], dtype: torch.dtype = torch.float64, device=None) -> st.SearchStrategy[torch.Tensor]:
    """Standard-normal tensors of `shape`."""
    return st.integers(0, 2**31 - 1).map(lambda s: random_tensor(shape, s, dtype, device))


@st.composite
def conv_geometries(
    draw,
    *,
    ndim: int | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
    groups: int | None = None,
    kernel_size: Sequence[int] | None = None,
    max_kernel: int = 5,
    max_stride: int = 3,
    max_dilation: int = 3,
    padding: str = "any",
    padding_modes: Sequence[str] = PADDING_MODES,
) -> ConvGeometry:
    """A random conv geometry: kernel 1..max_kernel per dim (odd, even, rectangular), anisotropic
    stride and dilation, groups over the common divisors of the channel counts (when given).

    `padding`: ``"any"`` (per side 0..d(k−1)+1: below, at and above centre, asymmetric),
    ``"symmetric"`` (same both sides, like ``nn.Conv``), ``"centred"`` (``'same'``-like),
    ``"none"`` (zero padding).
    """
    n = len(kernel_size) if kernel_size is not None else (draw(st.integers(1, 3)) if ndim is None else ndim)
    if n == 3:  # keep 3d volumes tiny: extents up to 5 instead of 13
        max_kernel, max_dilation = min(max_kernel, 3), min(max_dilation, 2)
    k = tuple(kernel_size) if kernel_size is not None else tuple(draw(st.integers(1, max_kernel)) for _ in range(n))
    s = tuple(draw(st.integers(1, max_stride)) for _ in range(n))
    d = tuple(draw(st.integers(1, max_dilation)) if ki > 1 else 1 for ki in k)
    if padding == "any":
        pads = tuple(
            (draw(st.integers(0, di * (ki - 1) + 1)), draw(st.integers(0, di * (ki - 1) + 1))) for ki, di in zip(k, d)
        )
    elif padding == "symmetric":
        pads = tuple((p, p) for p in (draw(st.integers(0, di * (ki - 1) + 1)) for ki, di in zip(k, d)))
    elif padding == "centred":
        pads = tuple((di * (ki - 1) // 2, di * (ki - 1) - di * (ki - 1) // 2) for ki, di in zip(k, d))
    elif padding == "none":
        pads = ((0, 0),) * n
    else:
        raise ValueError(f"unknown padding strategy {padding!r}")
    if groups is None:
        if in_channels is not None and out_channels is not None:
            common = [g for g in divisors(in_channels) if out_channels % g == 0]
            groups = draw(st.sampled_from(common))
        else:
            groups = 1
    mode = draw(st.sampled_from(tuple(padding_modes)))
    return ConvGeometry(k, s, d, pads, groups, mode)


def min_input_size(geometry: ConvGeometry, min_output: Sequence[int] | None = None) -> tuple[int, ...]:
    """The smallest spatial input for which `geometry` gives at least `min_output` (default 1)
    outputs per dim and its padding mode is defined (reflect needs size > pad, circular size >= pad)."""
    outs = min_output or (1,) * geometry.ndim
    sizes = []
    for e, s, (b, a), m in zip(geometry.extent, geometry.stride, geometry.padding, outs):
        n = max(1, (m - 1) * s + e - b - a)
        if geometry.padding_mode == "reflect":
            n = max(n, b + 1, a + 1)
        elif geometry.padding_mode == "circular":
            n = max(n, b, a)
        sizes.append(n)
    return tuple(sizes)


def min_chain_input_size(*geometries: ConvGeometry) -> tuple[int, ...]:
    """The smallest spatial input valid for the chain of convolutions `geometries` (first applied first)."""
    need = None
    for g in reversed(geometries):
        need = min_input_size(g, need)
    return need


@st.composite
def small_inputs(
    draw,
    channels: int,
    geometry: ConvGeometry | Sequence[ConvGeometry] | None = None,
    *,
    ndim: int | None = None,
    min_size: Sequence[int] | None = None,
    extra: int = 2,
    max_batch: int = 2,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> torch.Tensor:
    """A standard-normal input ``N × channels × spatial`` whose spatial size is just large enough
    for `geometry` (or every geometry given, or `min_size`) plus 0..`extra` per dim."""
    geoms = [] if geometry is None else ([geometry] if isinstance(geometry, ConvGeometry) else list(geometry))
    if min_size is None:
        n = ndim if ndim is not None else (geoms[0].ndim if geoms else 2)
        lo = [1] * n
        for g in geoms:
            lo = [max(a, b) for a, b in zip(lo, min_input_size(g))]
    else:
        lo = list(min_size)
    size = tuple(draw(st.integers(m, m + extra)) for m in lo)
    batch = draw(st.integers(1, max_batch))
    return draw(tensors((batch, channels) + size, dtype, device))


def _norm_statistics(channels: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(μ, σ², γ, β): μ ~ N(0, 1), σ² log-uniform in [1e-4, 1e2], γ ~ N(0, 1) with ~15% exact zeros, β ~ N(0, 1)."""
    mean = torch.randn(channels, generator=gen, dtype=dtype)
    var = 10.0 ** (torch.rand(channels, generator=gen, dtype=dtype) * 6 - 4)
    weight = torch.randn(channels, generator=gen, dtype=dtype)
    weight = torch.where(torch.rand(channels, generator=gen, dtype=dtype) < 0.15, torch.zeros_like(weight), weight)
    return mean, var, weight, torch.randn(channels, generator=gen, dtype=dtype)


@st.composite
def bn_stats(
    draw, channels: int, *, dtype: torch.dtype = torch.float64, device=None, allow_no_affine: bool = True
) -> NormStats:
    """Eval-mode BN statistics: mean ~ N(0, 1), var log-uniform in [1e-4, 1e2], γ normal with
    some exact zeros and negatives, β normal, ε ∈ {1e-5, 1e-3, 0.1}; sometimes affine=False."""
    seed = draw(st.integers(0, 2**31 - 1))
    eps = draw(st.sampled_from(EPSILONS))
    affine = draw(st.booleans()) if allow_no_affine else True
    gen = torch.Generator().manual_seed(seed + _BN_STREAM)  # a stream apart from `tensors` for equal seeds
    mean, var, weight, bias = _norm_statistics(channels, gen, dtype)
    if not affine:
        weight = bias = None
    to = lambda v: None if v is None else v.to(device)
    return NormStats(to(mean), to(var), to(weight), to(bias), eps)


def randomise_norms(module: nn.Module, seed: int) -> None:
    """Give every batch norm in `module` that has running statistics (FrozenBatchNorm2d included) random
    eval-mode statistics from `seed`, as `bn_stats` draws them:
    μ ~ N(0, 1), σ² log-uniform in [1e-4, 1e2], γ ~ N(0, 1) with some exact zeros (negatives included),
    β ~ N(0, 1). Merges that hold only for fresh norms (μ=0, σ²=1, γ=1, β=0) fail under it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            # BatchNorms with running statistics and FrozenBatchNorm2d (its four are buffers); a BN without
            # running statistics normalises with the batch's, which the merge refuses with its own error
            if not is_batch_norm(bn) or getattr(bn, "running_mean", None) is None:
                continue
            mean, var, weight, bias = _norm_statistics(bn.running_mean.shape[0], gen, torch.float64)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            if getattr(bn, "weight", None) is not None:
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)


def bn_module(stats: NormStats, ndim: int) -> torch.nn.Module:
    """An eval-mode ``BatchNorm{ndim}d`` holding `stats` (the oracle for norm folding)."""
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[ndim]
    c = stats.mean.shape[0]
    bn = cls(c, eps=stats.eps, affine=stats.weight is not None, dtype=stats.mean.dtype, device=stats.mean.device)
    with torch.no_grad():
        bn.running_mean.copy_(stats.mean)
        bn.running_var.copy_(stats.var)
        if stats.weight is not None:
            bn.weight.copy_(stats.weight)
            bn.bias.copy_(stats.bias)
    return bn.eval()


@st.composite
def conv_layers(
    draw,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    max_channels: int = 4,
    bias: bool | None = None,
    dtype: torch.dtype = torch.float64,
    **geometry_kwargs,
) -> tuple[ConvGeometry, torch.Tensor, torch.Tensor | None]:
    """``(geometry, kernel, bias)`` of a random conv (bias drawn on/off unless `bias` is given);
    the kernel is ``O × I/g × k…``. Extra keywords go to `conv_geometries`."""
    unit = geometry_kwargs.get("groups") or 1
    top = max(1, max_channels // unit)
    cin = in_channels if in_channels is not None else unit * draw(st.integers(1, top))
    cout = out_channels if out_channels is not None else unit * draw(st.integers(1, top))
    geometry = draw(conv_geometries(in_channels=cin, out_channels=cout, **geometry_kwargs))
    kernel = draw(tensors((cout, cin // geometry.groups) + geometry.kernel_size, dtype))
    has_bias = draw(st.booleans()) if bias is None else bias
    b = draw(tensors((cout,), dtype)) if has_bias else None
    return geometry, kernel, b
