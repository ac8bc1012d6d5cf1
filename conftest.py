"""Test order: the longest files first.

pytest-xdist (``--dist loadfile``) hands whole files to its workers in collection order, the
first two to each worker at the start; a long file started last would leave the other worker
idle at the end. With the four longest first, paired so that each worker's first two take
about as long (the parity matrix with the reliability runs, training parity with the
train.py runs), then the library conversions, the small files fill in and the workers finish
close together.
"""

from __future__ import annotations

import pytest

LONGEST_FIRST = (
    "parity_tests/test_forward_parity.py",
    "tests/test_reliability.py",
    "parity_tests/test_training_parity.py",
    "tests/test_train.py",
    "parity_tests/test_libraries.py",
    "tests/test_pipeline.py",
    "tests/test_bench_smoke.py",
    "tests/test_trainer.py",
    "tests/test_export.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within and between the other files is kept
