"""Shared fixtures of the test suite: small, seeded, offline."""
import importlib.util
import os
import sys

import pytest
import torch

# The independent reference (tests/_adavit_reference.py) is imported by name from the test modules.
sys.path.insert(0, os.path.dirname(__file__))

HAS_SPARSE = importlib.util.find_spec('adavit.execution.sparse') is not None
EXECUTORS = ['masked', pytest.param('sparse', marks=pytest.mark.skipif(not HAS_SPARSE, reason='no sparse executor'))]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """The eval executors: ``masked`` always, ``sparse`` once adavit/execution/sparse.py exists."""
    return request.param
