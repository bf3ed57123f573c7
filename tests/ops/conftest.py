"""`array_library`: a test module that uses it (``pytestmark = pytest.mark.usefixtures("array_library")``)
runs its property tests once per array library of `reparam.testing.backends`.

The algebra's tests draw torch tensors and compare against torch convolutions; for each library
other than torch the module's algebra functions are swapped, for its tests, with `on_backend`
wrappers, so the same properties are proven on numpy, jax.numpy and array-api-strict arrays. A
library that is not installed skips its runs.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
from hypothesis import settings

from reparam.testing.backends import ARRAY_LIBRARIES, on_backend

FEWER_EXAMPLES = {"jax": 10}
"""Examples per property on libraries that compile every op for every new shape (jax: ~0.1 s a call)."""

ALGEBRA_MODULES = frozenset(
    f"reparam.ops.{m}" for m in ("branches", "concat", "linear", "norm", "sequential", "slicing", "_array")
)
"""Where the array algebra lives (pure array-API code, no torch)."""


def _algebra_functions(namespace: dict) -> dict[str, object]:
    return {
        name: obj
        for name, obj in namespace.items()
        if inspect.isfunction(obj) and getattr(obj, "__module__", None) in ALGEBRA_MODULES
    }


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} not installed")
        )
        for name in ARRAY_LIBRARIES
    ],
)
def array_library(request):
    """The array library this module's algebra runs on (torch: the functions as they are)."""
    module = request.module
    originals = _algebra_functions(vars(module))
    for name, fn in originals.items():
        setattr(module, name, on_backend(fn, request.param))
    limits = _limit_examples(module, FEWER_EXAMPLES.get(request.param))
    try:
        yield request.param
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
        for test, original in limits.items():
            test._hypothesis_internal_use_settings = original


def _limit_examples(module, limit: int | None) -> dict:
    """At most `limit` examples for the module's hypothesis tests while the fixture lasts (hypothesis reads
    a test's settings from this attribute when the test runs); returns what to restore."""
    changed = {}
    for test in vars(module).values():
        current = getattr(test, "_hypothesis_internal_use_settings", None)
        if limit is not None and isinstance(current, settings) and current.max_examples > limit:
            changed[test] = current
            test._hypothesis_internal_use_settings = settings(current, max_examples=limit)
    return changed
