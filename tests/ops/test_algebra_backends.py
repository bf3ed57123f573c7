"""The algebra is one set of functions over every array library: the same numbers on numpy, jax.numpy
and array-api-strict as on torch, torch keeps dtype/device, and gradients flow through every merge
(online re-parameterisation)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reparam import ops
from reparam.ops import ConvGeometry, NormStats, conv_nd
from reparam.testing import bn_stats, conv_layers, random_tensor, small_inputs, tensors
from reparam.testing.backends import ARRAY_LIBRARIES, on_backend
from reparam.verify import relative_error

G3 = ConvGeometry.create(3, padding=1, groups=2)
G1 = ConvGeometry.create(1, padding=0, groups=2)
G_DIL = ConvGeometry.create(3, dilation=2, padding=2, groups=2)
G_STRIDE = ConvGeometry.create((3, 2), stride=(2, 1), padding=((1, 1), (0, 1)), groups=2)


def _stats(t, n) -> NormStats:
    return NormStats(t(n["mean"]), t(n["var"]), t(n["weight"]), t(n["bias"]), 1e-3)


# Each case maps (to_backend, drawn torch tensors) to an array or a tuple/list of arrays.
CASES = {
    "fuse_bn": lambda t, d: ops.fuse_bn(t(d["k3"]), t(d["b4"]), _stats(t, d)),
    "fuse_bn_transposed": lambda t, d: ops.fuse_bn_transposed(t(d["k3"]), t(d["b4"]), _stats(t, d), 2),
    "fuse_pre_bn": lambda t, d: ops.fuse_pre_bn(
        t(d["k3"]), t(d["b4"]), _stats(t, d), G3.replace(padding_mode="reflect")
    ),
    "fuse_pre_bn_linear": lambda t, d: ops.fuse_pre_bn(t(d["w"]), None, _stats(t, d), None),
    "bn_scale_shift": lambda t, d: ops.bn_scale_shift(_stats(t, d)),
    "compose_affine": lambda t, d: ops.compose_affine(t(d["mean"]), t(d["var"]), t(d["weight"]), t(d["bias"])),
    "scale_out": lambda t, d: ops.scale_out(t(d["k3"]), t(d["b4"]), t(d["mean"])),
    "scale_in": lambda t, d: ops.scale_in(t(d["k3"]), t(d["mean"]), 2),
    "propagate_bias": lambda t, d: ops.propagate_bias(t(d["k3"]), None, t(d["mean"]), G1.replace(kernel_size=(3, 3))),
    "fold_norm_affine": lambda t, d: ops.fold_norm_affine(t(d["w"]), t(d["b4"]), t(d["mean"]), t(d["bias"])),
    "add_branches": lambda t, d: ops.add_branches((t(d["k3"]), None), (t(d["k3"]), t(d["b4"]))),
    "embed_kernel": lambda t, d: ops.embed_kernel(t(d["k1"]), G1.replace(padding=((0, 0), (0, 0))), G3),
    "embed_dilated": lambda t, d: ops.embed_kernel(
        t(d["k3"]), G_DIL, G3.replace(kernel_size=(5, 5), padding=((2, 2), (2, 2)))
    ),
    "dilate_kernel": lambda t, d: ops.dilate_kernel(t(d["k3"]), (2, 3)),
    "identity_kernel": lambda t, d: ops.identity_kernel(4, 2, G_STRIDE, like=t(d["k3"])),
    "avg_pool_kernel": lambda t, d: ops.avg_pool_kernel(4, 2, (3, 2), like=t(d["k3"])),
    "dirac_plus": lambda t, d: ops.dirac_plus(t(d["k3"]), 2),
    "compose": lambda t, d: ops.compose(
        t(d["k3"]),
        t(d["b4"]),
        G_STRIDE.replace(kernel_size=(3, 3), padding=((1, 1), (1, 1))),
        t(d["k3"]),
        t(d["b4"]),
        G_DIL.replace(padding=((0, 0), (0, 0))),
    )[:2],
    "compose_1x1_kxk": lambda t, d: ops.compose_1x1_kxk(t(d["k1"]), t(d["b4"]), t(d["k3"]), None, 2, 2),
    "compose_kxk_1x1": lambda t, d: ops.compose_kxk_1x1(t(d["k3"]), t(d["b4"]), t(d["k1"]), t(d["b4"]), 2, 2),
    "compose_linear": lambda t, d: ops.compose_linear(t(d["w"]), None, t(d["w"]), t(d["b4"])),
    "compose_depthwise_pointwise": lambda t, d: ops.compose_depthwise_pointwise(
        t(d["dw"]), t(d["b4"]), ops.linear_to_conv(t(d["w"]), 2), None, 4, 1
    ),
    "pad_value_for_1x1_bias": lambda t, d: ops.pad_value_for_1x1_bias(t(d["b4"]), _stats(t, d)),
    "concat_out": lambda t, d: ops.concat_out((t(d["k3"]), None), (t(d["k3"]), t(d["b4"]))),
    "split_in": lambda t, d: ops.split_in(t(d["k3"]), [1, 3], 2),
    "ungroup_kernel": lambda t, d: ops.ungroup_kernel(t(d["k3"]), 2, 1),
    "linear_to_conv": lambda t, d: ops.linear_to_conv(t(d["w"]), 2),
    "conv1x1_to_linear": lambda t, d: ops.conv1x1_to_linear(t(d["k1"])),
    "conv_to_linear": lambda t, d: ops.conv_to_linear(t(d["k3"]), t(d["b4"]), (2, 3, 3)),
    "repeat_norm_for_fc": lambda t, d: ops.bn_scale_shift(ops.repeat_norm_for_fc(_stats(t, d), 3)),
    "select_out": lambda t, d: ops.select_out(t(d["k3"]), t(d["b4"]), [0, 3], groups=2)[:2],
    "select_in": lambda t, d: ops.select_in(t(d["k3"]), [1, 3], 2)[0],
    "select_norm": lambda t, d: ops.bn_scale_shift(ops.select_norm(_stats(t, d), [1, 2])),
    "select_axes": lambda t, d: ops.slicing.select_axes(t(d["k3"]), [[0, 3], None, [1]]),
}


def _case_tensors(seed: int) -> dict[str, torch.Tensor]:
    shapes = {
        "k3": (4, 2, 3, 3),
        "k1": (4, 2, 1, 1),
        "dw": (4, 1, 3, 3),
        "w": (4, 4),
        "b4": (4,),
        "mean": (4,),
        "weight": (4,),
        "bias": (4,),
        "var": (4,),
    }
    d = {name: random_tensor(shape, seed + i) for i, (name, shape) in enumerate(shapes.items())}
    d["var"] = d["var"].exp()
    return d


case_inputs = st.integers(0, 2**31 - 1).map(_case_tensors)


def _flat(out) -> list[np.ndarray]:
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat(o)]
    if out is None:
        return []
    return [out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)]


def test_every_algebra_function_has_a_backend_case():
    from reparam.ops import branches, concat, linear, norm, sequential, slicing

    exported = {name for module in (branches, concat, linear, norm, sequential, slicing) for name in module.__all__}
    not_array_functions = {
        "NormStats",
        "composed_groups",
        "matching_group_channels",
        "embed_offset",
        "shift_to_bias",
    }
    covered = set(CASES) | {"fuse_pre_bn"}
    assert exported - not_array_functions <= covered, exported - not_array_functions - covered


@pytest.mark.parametrize("library", [lib for lib in ARRAY_LIBRARIES if lib != "torch"])
@pytest.mark.parametrize("name", sorted(CASES))
@given(d=case_inputs)
def test_every_library_agrees_with_torch(name, library, d):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} not installed")
    case = CASES[name]
    from_torch = _flat(case(lambda v: v, d))
    from_library = _flat(on_backend(case, library)(lambda v: v, d))
    assert len(from_torch) == len(from_library)
    for a, b in zip(from_torch, from_library):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(a).max()))


def test_numpy_in_numpy_out():
    d = _case_tensors(0)
    for name, case in CASES.items():
        out = case(lambda v: v.numpy(), d)
        assert all(isinstance(a, np.ndarray) for a in _flat(out)), name


def _online_kernel(k3, k1, gamma, beta, scale, mean, var):
    """A RepVGG-like block merged as a differentiable function of its parameters."""
    stats = NormStats(mean, var, gamma, beta, 1e-3)
    main = ops.fuse_bn(k3, None, stats)
    side = ops.fuse_bn(ops.embed_kernel(k1, G1, G3), None, stats)
    ident = ops.fuse_bn(ops.identity_kernel(4, 2, G3, like=k3), None, stats)
    k, b = ops.add_branches(main, side, ident)
    k, b = ops.scale_out(k, b, scale)
    k, b, g = ops.compose(k, b, G3, k1, None, G1)
    k, b, _ = ops.compose(k, b, g, k3[:2], None, G_DIL.replace(padding=((0, 0), (0, 0))))
    return k, b


def test_gradients_flow_through_a_merge():
    torch.manual_seed(0)
    args = (
        torch.randn(4, 2, 3, 3),
        torch.randn(4, 2, 1, 1),
        torch.randn(4),
        torch.randn(4),
        torch.randn(4),
        torch.randn(4),
        torch.rand(4) + 0.5,
    )
    args = tuple(a.double().requires_grad_() for a in args)
    assert torch.autograd.gradcheck(_online_kernel, args, fast_mode=True)


@given(st.data())
def test_autograd_matches_the_unmerged_branches(data):
    """Online merging: the gradient through the merged kernel equals the gradient of the branch sum."""
    g, k, b = data.draw(conv_layers(bias=True, padding="centred"))
    g = g.replace(stride=(1,) * g.ndim)
    k1 = data.draw(tensors((k.shape[0], k.shape[1]) + (1,) * g.ndim))
    src = g.replace(
        kernel_size=(1,) * g.ndim,
        dilation=(1,) * g.ndim,
        padding=tuple(
            (pb - d * ((kk - 1) // 2), pa - d * (kk - 1 - (kk - 1) // 2))
            for (pb, pa), d, kk in zip(g.padding, g.dilation, g.kernel_size)
        ),
    )
    x = data.draw(small_inputs(k.shape[1] * g.groups, g))
    k, k1 = k.requires_grad_(), k1.requires_grad_()
    (conv_nd(x, k, b, g) + conv_nd(x, k1, None, src)).square().sum().backward()
    ref = (k.grad.clone(), k1.grad.clone())
    k.grad = k1.grad = None
    km, bm = ops.add_branches((k, b), (ops.embed_kernel(k1, src, g), None))
    conv_nd(x, km, bm, g).square().sum().backward()
    assert relative_error(ref[0], k.grad) <= 1e-10 and relative_error(ref[1], k1.grad) <= 1e-10


@given(st.data())
@torch.no_grad()
def test_float32_merge_within_tolerance(data):
    """float32 inputs stay float32 and the merged conv is within 1e-5 of max|y| of the float64 oracle."""
    g, k, b = data.draw(conv_layers(dtype=torch.float32))
    stats = data.draw(bn_stats(k.shape[0], dtype=torch.float32))
    x = data.draw(small_inputs(k.shape[1] * g.groups, g, dtype=torch.float32))
    ident_ok = g.padding == tuple(
        (d * ((kk - 1) // 2), d * (kk - 1 - (kk - 1) // 2)) for kk, d in zip(g.kernel_size, g.dilation)
    )
    km, bm = ops.fuse_bn(k, b, stats)
    assert km.dtype == bm.dtype == torch.float32
    d64 = lambda v: None if v is None else v.double()  # noqa: E731
    s64 = NormStats(*(d64(getattr(stats, f)) for f in ("mean", "var", "weight", "bias")), stats.eps)
    s, t = ops.bn_scale_shift(s64)
    view = (1, -1) + (1,) * g.ndim
    ref = s.reshape(view) * conv_nd(x.double(), k.double(), d64(b), g) + t.reshape(view)
    assert relative_error(ref, conv_nd(x, km, bm, g)) <= 1e-5
    if ident_ok and k.shape[0] == k.shape[1] * g.groups:
        ki = ops.identity_kernel(k.shape[0], g.groups, g, like=k)
        assert ki.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_device():
    dev = torch.device("cuda")
    k = torch.randn(4, 2, 3, 3, device=dev, dtype=torch.float64)
    stats = NormStats(*(torch.rand(4, device=dev, dtype=torch.float64) + 0.1 for _ in range(4)), 1e-5)
    for out in (
        ops.fuse_bn(k, None, stats)[0],
        ops.identity_kernel(4, 2, G3, like=k),
        ops.dirac_plus(k[:, :, :1, :1], 2),
        ops.compose(k, None, G3, k, None, G3.replace(padding=((0, 0), (0, 0))))[0],
        ops.select_in(k, [0, 2], 2)[0],
        ops.avg_pool_kernel(4, 2, (3, 3), like=k),
    ):
        assert out.device.type == "cuda" and out.dtype == torch.float64
