"""Run array-API code on several array libraries: numpy, torch, jax.numpy and array-api-strict.

A property test draws torch tensors (the strategies of this package) and checks the algebra against
a torch oracle; `on_backend(fn, name)` runs `fn` itself on another library's arrays instead — every
torch tensor in its arguments (also inside tuples, lists, dicts and dataclasses such as `NormStats`)
becomes that library's array, every array in its result becomes a torch tensor again, dtype kept — so
the same test proves the same property there. ``array_api_strict`` refuses any call outside the array
API standard, so a function that passes on it uses nothing else. jax runs with 64-bit types enabled
for the call only (``jax.enable_x64``), so float64 stays float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ARRAY_LIBRARIES", "ArrayLibrary", "array_library", "on_backend"]

ARRAY_LIBRARIES = ("torch", "numpy", "jax", "array_api_strict")
"""The libraries `on_backend` knows, by the name of the module they import as."""


@dataclass(frozen=True)
class ArrayLibrary:
    """How to move arrays into one library and back, and the context its calls run in."""

    name: str
    from_numpy: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    is_array: Callable[[Any], bool]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _jax() -> ArrayLibrary:
    import jax
    import jax.numpy as jnp

    return ArrayLibrary(
        "jax", jnp.asarray, np.asarray, lambda x: isinstance(x, jax.Array), lambda: jax.enable_x64(True)
    )


def _strict() -> ArrayLibrary:
    import array_api_strict as xps

    array_type = type(xps.asarray(0.0))
    return ArrayLibrary("array_api_strict", xps.asarray, np.from_dlpack, lambda x: isinstance(x, array_type))


_MAKERS: dict[str, Callable[[], ArrayLibrary]] = {
    "torch": lambda: ArrayLibrary("torch", torch.from_numpy, np.asarray, lambda x: isinstance(x, torch.Tensor)),
    "numpy": lambda: ArrayLibrary("numpy", lambda a: a, np.asarray, lambda x: isinstance(x, np.ndarray)),
    "jax": _jax,
    "array_api_strict": _strict,
}


@functools.cache
def array_library(name: str) -> ArrayLibrary:
    """The `ArrayLibrary` called `name` (one of `ARRAY_LIBRARIES`); ImportError when it is not installed."""
    if name not in _MAKERS:
        raise ValueError(f"unknown array library {name!r}; expected one of {ARRAY_LIBRARIES}")
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"array library {name!r} is not installed (pip install {name.replace('_', '-')})")
    return _MAKERS[name]()


def _convert(obj: Any, is_source: Callable[[Any], bool], move: Callable[[Any], Any]) -> Any:
    """`obj` with every source array replaced by `move(array)`, through containers and dataclasses."""
    if is_source(obj):
        return move(obj)
    if isinstance(obj, tuple):
        return tuple(_convert(v, is_source, move) for v in obj)
    if isinstance(obj, list):
        return [_convert(v, is_source, move) for v in obj]
    if isinstance(obj, dict):
        return {k: _convert(v, is_source, move) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _convert(getattr(obj, f.name), is_source, move) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def on_backend(fn: Callable, name: str) -> Callable:
    """`fn` run on the arrays of library `name`: torch tensor arguments in, torch tensors out.

    The tensors are detached and copied through numpy (so no gradient flows across the call); the
    result's arrays come back as CPU torch tensors of the dtype the library returned. Errors `fn`
    raises propagate unchanged. ``name="torch"`` returns `fn` itself.
    """
    if name == "torch":
        return fn
    lib = array_library(name)
    is_tensor = lambda x: isinstance(x, torch.Tensor)  # noqa: E731

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with lib.context():
            to_lib = lambda t: lib.from_numpy(t.detach().cpu().numpy())  # noqa: E731
            args, kwargs = _convert((args, kwargs), is_tensor, to_lib)
            out = fn(*args, **kwargs)
            return _convert(out, lib.is_array, lambda a: torch.from_numpy(np.array(lib.to_numpy(a))))

    return run
