import zlib

import numpy as np
import pytest

import numbattn


@pytest.fixture(autouse=True)
def _parallel_kernels(monkeypatch):
    """The parallel kernels run even the tiny calls of the tests (which would
    otherwise take the serial twins below config.CPU_SERIAL_WORK; the twins
    are checked against them in tests/test_plans.py)."""
    monkeypatch.setattr(numbattn.config, "CPU_SERIAL_WORK", 0)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test id (reproducible)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(params=["default-tiles", "tiny-tiles"])
def tiles(request, monkeypatch):
    """Run with the shipped tile sizes and with tiny ones (multi-tile paths)."""
    if request.param == "tiny-tiles":
        monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", 3)
        monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", 5)
        monkeypatch.setattr(numbattn.config, "CPU_SCORES_QUERY_TILE", 3)
        monkeypatch.setattr(numbattn.config, "CPU_SCORES_KEY_TILE", 5)
    return request.param
