"""Shared test configuration.

Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable:
  ci   (default in `make test`): 100 examples per property, no deadline;
  dev  fast local iteration: 20 examples;
  deep nightly-style: 2000 examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=20, **_COMMON)
settings.register_profile("deep", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATA = Path(os.environ.get("REPARAM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Tests run in parallel processes (`pytest -n 2`): one intra-op thread each avoids oversubscription."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """The optional real-data folder (`../shared/data`); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set REPARAM_SHARED_DATA)")
    return SHARED_DATA
