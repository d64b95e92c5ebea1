"""Test set-up: real Prefect (ephemeral, its own home), real MLflow on a temp SQLite store, offline."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect: its settings are read at import time.
_PREFECT_HOME = tempfile.mkdtemp(prefix="int8flow-test-prefect-")
os.environ.update(
    {
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
)
sys.path.insert(0, str(Path(__file__).parent))

import digits  # noqa: E402  (tests/digits.py, needs sys.path above)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> digits.DigitsFixture:
    """A small model fitted to scikit-learn's real handwritten digits, with its data files."""
    return digits.build(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow SQLite store (and artifact folder) under tmp_path, used as the working dir."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
