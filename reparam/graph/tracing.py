"""torch.fx front end: symbolic trace plus shape propagation, with errors that say what to do."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

from .errors import GraphTraceError
from .rules import is_rule_leaf

LeafSpec = str | type[nn.Module]


class _LeafTracer(fx.Tracer):
    """Tracer that also treats user-named modules (qualified names or classes) as leaves and
    remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]):
        super().__init__()
        specs = tuple(leaf_modules)
        self._leaf_names = {s for s in specs if isinstance(s, str)}
        self._leaf_types = tuple(s for s in specs if isinstance(s, type))
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if is_rule_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._attr_names: tuple[dict[int, str], dict[int, str]] | None = None
        saved = _plain_state(root) if isinstance(root, nn.Module) else []
        try:
            return super().trace(root, concrete_args)
        finally:
            _drop_leaked_proxies(saved)

    def _names(self) -> tuple[dict[int, str], dict[int, str]]:
        """``id(tensor) → qualified name`` of the root's parameters and buffers, built once per trace."""
        if self._attr_names is None:
            params, buffers = {}, {}
            for name, p in self.root.named_parameters():
                params.setdefault(id(p), name)
            for name, b in self.root.named_buffers():
                buffers.setdefault(id(b), name)
            self._attr_names = params, buffers
        return self._attr_names

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's lookup, with the tensor → qualified-name search done once per trace through a table.

        fx scans every named parameter (or buffer) of the root on each attribute access, which is
        quadratic for models that read many tensors as attributes in `forward` (Swin V2: ~0.5 s)."""
        if self.param_shapes_constant or not isinstance(attr_val, torch.Tensor):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        params, buffers = self._names()
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """fx's argument emission, with a root tensor found through the same table: fx scans every named
        buffer for each tensor passed as an argument (a norm layer calling ``F.batch_norm`` on its own
        running statistics: ~0.4 s on a RepVGG)."""
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            params, buffers = self._names()
            name = (params if isinstance(a, nn.Parameter) else buffers).get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.module_stack_names.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return out


_PLAIN_SKIP = frozenset(("_parameters", "_buffers", "_modules"))
_MISSING = object()
_Saved = list[tuple[nn.Module, dict[str, Any]]]


def _plain_state(root: nn.Module) -> _Saved:
    """Every module's plain attributes (not parameters, buffers or submodules) as they are before a trace."""
    return [(m, dict(vars(m))) for m in root.modules()]


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v) for v in value)
    return False


def _drop_leaked_proxies(saved: _Saved) -> None:
    """Undo what a traced `forward` stored in its modules that holds proxies (a per-device cache
    ``self.cache[key] = self.biases[:, idx]`` filled in eval mode): a proxy of this trace kept in the model
    would be read as a value by the next trace, whose program then references a node of another graph.
    An attribute bound to a proxy gets its value from before the trace back (or goes, if it is new); a
    dict or list keeps its other entries and loses those that hold proxies."""
    for m, before in saved:
        for k, v in list(vars(m).items()):
            old = before.get(k, _MISSING)
            if k in _PLAIN_SKIP or (old is v and not (v and isinstance(v, (dict, list)))) or not _holds_proxy(v):
                continue
            if old is not v:  # bound during the trace
                if old is _MISSING:
                    delattr(m, k)
                else:
                    object.__setattr__(m, k, old)
            elif isinstance(v, dict):
                for key in [key for key, item in v.items() if _holds_proxy(item)]:
                    del v[key]
            else:
                v[:] = [item for item in v if not _holds_proxy(item)]


def as_tuple(example_inputs: torch.Tensor | tuple | list) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def symbolic_trace(
    model: nn.Module, leaf_modules: Iterable[LeafSpec] = (), concrete_args: Mapping[str, Any] | None = None
) -> fx.Graph:
    """Trace `model` with torch.fx; on failure raise `GraphTraceError` naming the innermost module."""
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        where = tracer.module_stack_names[-1] if tracer.module_stack_names else "<root>"
        owner = model.get_submodule(where) if where != "<root>" else model
        raise GraphTraceError(
            f"torch.fx could not trace module '{where}' ({type(owner).__name__}): {type(exc).__name__}: {exc}. "
            f"Mark it a leaf with trace(..., leaf_modules=('{where}',)) (its channels then stay unpruned), "
            f"or fix data-dependent control flow with concrete_args={{...}}."
        ) from exc
    return graph


def _meta(value: Any) -> Any:
    """Shape and dtype of a node's value (tensors, possibly inside tuples/lists), in ShapeProp's format."""
    if isinstance(value, torch.Tensor):
        return TensorMetadata(value.shape, value.dtype, value.requires_grad, (), None, False, {})
    if isinstance(value, (tuple, list)):
        return type(value)(_meta(v) for v in value) if type(value) in (tuple, list) else tuple(_meta(v) for v in value)
    return None


class _ShapeRecorder(fx.Interpreter):  # runs on the model itself: no GraphModule codegen needed
    """Runs the traced program once, recording every node's output shapes as `meta['tensor_meta']` (a
    lighter ShapeProp), and measuring with `torch.utils.flop_counter` the MACs of opaque nodes (ops
    the channel rules do not model, e.g. a leaf attention module) as `meta['opaque_macs']`."""

    def __init__(self, root: nn.Module, graph: fx.Graph, opaque: Callable[[fx.Node], bool]):
        super().__init__(root, graph=graph)
        self._opaque = opaque

    def _computes(self, n: fx.Node) -> bool:
        """Whether the node can cost MACs: it reads a tensor, and is not an attribute lookup (``x.shape``)."""
        return n.target is not getattr and any(isinstance(self.env[a], torch.Tensor) for a in n.all_input_nodes)

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("call_module", "call_function", "call_method") and self._computes(n) and self._opaque(n):
            # with grad enabled, fused inference fast paths (which the counter cannot see) stay off
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                out = super().run_node(n)
            out = out.detach() if isinstance(out, torch.Tensor) else out
            n.meta["opaque_macs"] = counter.get_total_flops() // 2
        else:
            out = super().run_node(n)
        meta = _meta(out)
        if meta is not None:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)
        return out


def propagate_shapes(
    root: nn.Module, graph: fx.Graph, example_inputs: tuple, opaque: Callable[[fx.Node], bool] = lambda n: False
) -> None:
    """Annotate every node with `meta['tensor_meta']` by running the traced program once (eval mode,
    no grad; the modules' train/eval flags are restored afterwards, so running statistics are untouched)."""
    training = [m for m in root.modules() if m.training]
    for m in training:
        m.training = False
    try:
        with torch.no_grad():
            _ShapeRecorder(root, graph, opaque).run(*example_inputs)
    except Exception as exc:
        raise GraphTraceError(
            f"running the traced program on the example inputs failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for m in training:
            m.training = True
