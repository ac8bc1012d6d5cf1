"""Shared fixtures for the parity tests; the comparison logic lives in ``harness.py``."""

from __future__ import annotations

import pytest

from parity_tests import harness


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory):
    """One directory for the weight files every parity run writes and reads back."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture
def run_parity(weights_dir):
    """``run_parity(cfg)``: torch_ref -> file -> flax_resnet, compared (a ParityResult)."""

    def run(cfg: harness.Config) -> harness.ParityResult:
        return harness.run_config(cfg, weights_dir)

    return run
