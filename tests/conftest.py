"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real churn CSVs (BankChurners, Telco); the test is skipped when it is absent.

    ``FEDCHURN_REAL_DATA_DIR`` overrides the default, ``../shared/data`` next to the repository.
    """
    configured = os.environ.get("FEDCHURN_REAL_DATA_DIR")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"real churn data not found at {folder} (set FEDCHURN_REAL_DATA_DIR to its folder)")
    return folder


@pytest.fixture(scope="session")
def privacy_vectors() -> list[dict[str, Any]]:
    """Known ε values from independent accountants (Opacus RDP/PRV, Google dp-accounting PLD).

    ``FEDCHURN_PRIVACY_VECTORS`` overrides the default, ``../shared/privacy_vectors.json`` next to the repository;
    the test is skipped when the file is absent (tests/test_privacy.py keeps a few of its values inline).
    """
    configured = os.environ.get("FEDCHURN_PRIVACY_VECTORS")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "privacy_vectors.json"
    if not path.is_file():
        pytest.skip(f"privacy vectors not found at {path} (set FEDCHURN_PRIVACY_VECTORS to the JSON file)")
    vectors = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(vectors, list) or not vectors:
        raise ValueError(f"{path} must hold a non-empty JSON list of vectors")
    return vectors


@pytest.fixture(autouse=True, scope="session")
def _offline_quiet_environment() -> None:
    """No telemetry, no runtime dependency installs, short Ray socket paths: for every test."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/fcray")


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Any:
    """The CLI configures its loggers (handlers on captured streams, levels, propagation) when a test calls
    ``main``; put them back afterwards so no later test logs into a closed stream or sees a record twice."""
    import logging

    names = ("", "fedchurn", "fedchurn.progress", "flwr")
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
