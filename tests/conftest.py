"""Fixtures shared by the tests that run ``train.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    """One JAX persistent compilation cache for every ``train.py`` the tests start, shared by
    the pytest-xdist workers (JAX writes its entries atomically), so that a model compiled
    in one test file is loaded, not compiled again, in the others."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    cache = shared / "jax-cache"
    cache.mkdir(exist_ok=True)
    return cache
