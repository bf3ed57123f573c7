"""torch.export front end: the model's ATen graph, in the form the channel rules read.

`torch.export` captures programs torch.fx cannot trace symbolically (Python on sizes: ``len(x)``,
``range(x.shape[1])``, ``math.sqrt(x.size(-1))``, shape-dependent branches), specialised to the example
inputs' shapes. Its parameters and buffers arrive as placeholders; they become ``get_attr`` nodes of their
qualified names, so they are members of channel groups exactly as in a torch.fx trace, and the graph runs
on the original model (surgery slices the model's tensors; the pruned model is a `torch.fx.GraphModule`
of ATen ops).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import torch
from torch import fx, nn
from torch.utils._pytree import tree_unflatten

from .errors import GraphTraceError

__all__ = ["export_graph"]


@contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export logs (and prints) its failed guesses; the GraphTraceError says what failed instead."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


def export_graph(model: nn.Module, example_inputs: tuple) -> fx.Graph:
    """The ATen graph of ``model`` on ``example_inputs`` (non-strict `torch.export`, eval mode), with
    every parameter and buffer read through ``get_attr``. GraphTraceError when export fails or the
    program mutates a buffer or holds tensor constants (those have no module attribute to slice)."""
    try:
        with _quiet_export():
            program = torch.export.export(model, example_inputs, strict=False)
    except Exception as exc:
        raise GraphTraceError(
            f"torch.export could not capture the model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    sig = program.graph_signature
    if sig.buffers_to_mutate or sig.inputs_to_lifted_tensor_constants:
        what = (
            "mutates buffers " + str(sorted(sig.buffers_to_mutate.values()))
            if sig.buffers_to_mutate
            else "holds tensor constants " + str(sorted(sig.inputs_to_lifted_tensor_constants.values()))
        )
        raise GraphTraceError(f"the exported program {what}; put the model in eval mode or use frontend='fx'")
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node in placeholders:  # user inputs stay placeholders, in order
        if node.name not in names:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
    for node in placeholders:
        if node.name in names:
            env[node] = graph.get_attr(names[node.name])
    for node in program.graph.nodes:
        if node.op == "output":  # the model's own output structure, not export's flat tuple
            flat = [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            graph.output(tree_unflatten(flat, program.call_spec.out_spec))
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return graph
