"""`assert_mergeable`: the equivalence proof a mergeable block owes, for built-in and user blocks alike.

A block is mergeable when, in eval mode and with *any* norm statistics, its plain deploy form computes
the same function: ``block(x) == block.merged()(x) == reparam.merge(block)(x)``. The check runs each
candidate in float64 (max|Δ| ≤ 1e-10·max|y|) and in float32 (max|Δ| ≤ 1e-5·max|y| against the float64
output), with every norm randomised. Where a norm's shift cancels the output (tiny variances make
|γ/σ| large, so y is a small difference of large terms) float32 rounds the *terms*, in the unmerged
block too: the float32 bound is then 1e-5 of the terms' scale max(|W|∗|x| + |b|), measured on every
conv and linear layer of the deploy form.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from reparam.merge import merge
from reparam.ops import ConvGeometry
from reparam.ops.blocks.base import MergeableBlock
from reparam.verify import relative_error

from .strategies import conv_geometries, randomise_norms, small_inputs

__all__ = ["MergeCheck", "assert_mergeable", "check_mergeable"]

RTOL64, RTOL32 = 1e-10, 1e-5


@dataclass(frozen=True)
class MergeCheck:
    """Errors (max|Δ| / max|y| against the float64 block) of each deploy form, per dtype."""

    errors64: dict[str, float]
    errors32: dict[str, float]
    term_scale: float
    """max(|W|∗|x| + |b|) of the deploy form's layers over max|y| (at least 1): float32 rounds terms that size."""

    def failures(self, rtol64: float = RTOL64, rtol32: float = RTOL32) -> list[str]:
        bound32 = rtol32 * self.term_scale
        return [
            f"{name} in float64: {err:.3g} > {rtol64:g}" for name, err in self.errors64.items() if not err <= rtol64
        ] + [
            f"{name} in float32: {err:.3g} > {bound32:.3g}" for name, err in self.errors32.items() if not err <= bound32
        ]


def _deploy_forms(block: nn.Module) -> dict[str, nn.Module]:
    forms = {"block.merged()": block.merged()} if isinstance(block, MergeableBlock) else {}
    merged = merge(block)
    if isinstance(block, MergeableBlock) and not merged.merge_report.blocks:
        raise AssertionError(
            f"reparam.merge left {type(block).__name__} unmerged: it is a MergeableBlock but not a "
            f"registered one (decorate the class with @reparam.ops.blocks.register_block)"
        )
    forms["reparam.merge(block)"] = merged
    return forms


@torch.no_grad()
def _term_scale(form: nn.Module, x: Tensor, y: Tensor) -> float:
    """max over the conv / linear layers of `form` of max(|W|∗|x_in| + |b|) on their inputs, over max|y|."""
    seen: list[tuple[nn.Module, Tensor]] = []
    layers = [m for m in form.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_hook(lambda layer, args, _out: seen.append((layer, args[0]))) for m in layers]
    try:
        form(x)
    finally:
        for h in handles:
            h.remove()
    scales = []
    for layer, inp in seen:
        magnitude = copy.deepcopy(layer)
        for p in magnitude.parameters():
            p.abs_()
        scales.append(float(magnitude(inp.abs()).abs().max()))
    top = float(y.abs().max())
    return max([1.0] + [s / top for s in scales]) if top > 0 else 1.0


@torch.no_grad()
def check_mergeable(block: nn.Module, x: Tensor, *, seed: int = 0) -> MergeCheck:
    """Randomise every norm of a copy of `block` (`seed`), put it in eval mode and measure each deploy form
    (`block.merged()` for a `MergeableBlock`, and `reparam.merge(block)`) against it on `x`, in float64
    and float32. `block` itself is untouched."""
    ref = copy.deepcopy(block).double().eval()
    randomise_norms(ref, seed)
    x64 = x.double()
    y = ref(x64)
    forms = _deploy_forms(ref)
    errors64 = {name: relative_error(y, form(x64)) for name, form in forms.items()}
    x32 = x64.float()
    errors32 = {name: relative_error(y, form(x32)) for name, form in _deploy_forms(copy.deepcopy(ref).float()).items()}
    return MergeCheck(errors64, errors32, max(_term_scale(form, x64, y) for form in forms.values()))


def assert_mergeable(
    block: nn.Module | Callable[[ConvGeometry], nn.Module],
    x: Tensor | None = None,
    *,
    in_channels: int | None = None,
    geometries: st.SearchStrategy[ConvGeometry] | None = None,
    max_examples: int = 50,
    rtol64: float = RTOL64,
    rtol32: float = RTOL32,
) -> None:
    """Prove that a block equals its deploy forms, or fail with the smallest counterexample.

    * ``assert_mergeable(block, x)``: one block on one input, with norm statistics drawn by hypothesis;
    * ``assert_mergeable(factory, in_channels=C, geometries=...)``: ``factory(geometry)`` builds a block
      for each drawn `ConvGeometry` (default: any 2-D geometry with symmetric padding and groups dividing
      `C`; a factory whose blocks take fewer options passes its own `geometries`), run on a small
      input of `C` channels just large enough for that geometry. A failure reports the geometry, input
      shape and norm seed hypothesis shrank it to.

    Tolerances: see the module docstring (`rtol64`, `rtol32`)."""
    if isinstance(block, nn.Module):
        if x is None:
            raise TypeError("assert_mergeable(block, x): a block instance needs its input x")
        fixed = block
        cases: st.SearchStrategy = st.just((None, x))
    else:
        if in_channels is None:
            raise TypeError("assert_mergeable(factory, in_channels=C): a factory needs the input's channel count")
        default = conv_geometries(ndim=2, padding="symmetric", in_channels=in_channels, out_channels=in_channels)
        fixed, geoms = None, geometries if geometries is not None else default
        cases = geoms.flatmap(lambda g: small_inputs(in_channels, g).map(lambda t: (g, t)))

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(case=cases, seed=st.integers(0, 2**16))
    def prove(case: tuple[ConvGeometry | None, Tensor], seed: int) -> None:
        geometry, t = case
        if fixed is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # weights drawn from the seed too: a replayed example is the same block
                module = block(geometry)
        else:
            module = fixed
        failures = check_mergeable(module, t, seed=seed).failures(rtol64, rtol32)
        if failures:
            where = f", {geometry}" if geometry is not None else ""
            raise AssertionError(
                f"{type(module).__name__} is not equal to its deploy form on input "
                f"{tuple(t.shape)} (seed {seed}{where}): " + "; ".join(failures)
            )

    prove()
