"""Shared test fixtures.

Real data lives in ../shared/data beside the repository (see its SOURCES.md); override the location with the
SHARED_DATA environment variable. On a user's machine without it, tests that need it are skipped with a reason.
In CI (the CI variable is set) a missing file is a failure, never a skip: a green CI must mean the real-data
tests ran.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the top-level scripts are imported as modules
sys.path.insert(1, str(ROOT / "tools"))  # and the workshop scripts beside them

SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))


def require_shared(relpath: str) -> Path:
    """Path of a file or folder under ../shared/data; skip (user) or fail (CI) when it is missing."""
    path = SHARED_DATA / relpath
    if not path.exists():
        message = f"real data missing: {path} (set SHARED_DATA to the folder holding shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI must run every real-data test")
        pytest.skip(message)
    return path


def require_module(name: str):
    """Import an optional test-only module (transformers, matplotlib); skip (user) or fail (CI) without it."""
    try:
        return __import__(name)
    except ImportError:
        message = f"optional test dependency missing: {name} (pip install -r requirements-test.txt)"
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI must run every reference test")
        pytest.skip(message)


@pytest.fixture
def shared_data():
    """The ../shared/data folder itself (skip on a user's machine without it, fail in CI)."""
    return require_shared("")


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models: on a shared 2-core machine one thread is several times faster than two (no OpenMP
    hand-offs), and results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
