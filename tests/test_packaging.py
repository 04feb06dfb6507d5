"""The top-level import names resolve to this repository, so nothing else installed can shadow them."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["server", "clients", "shared"])
def test_import_names_resolve_inside_this_repo(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name


def test_flower_components_load_from_this_repo() -> None:
    from clients.app import app as client_app
    from server.app import app as server_app

    assert type(server_app).__name__ == "ServerApp"
    assert type(client_app).__name__ == "ClientApp"


def test_console_script_is_installed_and_runs() -> None:
    script = shutil.which("fedchurn") or pytest.fail("no 'fedchurn' on PATH: install with pip install -e .")
    result = subprocess.run([script, "config", "show"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0
    assert "privacy:" in result.stdout
