"""Shared test set-up: a numba cache that survives between runs and subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures for the fake Databento gateways (api_key, fake_historical, fake_live).
pytest_plugins = ["tests.fakes"]

REPO = Path(__file__).resolve().parents[1]
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"

# Before anything imports numba: one writable cache for this process and every subprocess.
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
os.environ.pop("DATABENTO_API_KEY", None)


@pytest.fixture
def testdata() -> Path:
    """The real Databento DBN files beside the repository; skip when absent."""
    if not SHARED_TESTDATA.is_dir():
        pytest.skip(f"{SHARED_TESTDATA} not present")
    return SHARED_TESTDATA
