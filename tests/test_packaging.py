"""One import name, ``fedchurn``: the Flower apps' folders resolve under it, to this repository."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["server", "clients", "shared"])
def test_app_folders_import_under_the_fedchurn_name(name: str) -> None:
    module = importlib.import_module(f"fedchurn.{name}")
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """A subpackage missing from pyproject's list would be absent from an installed (non-editable) fedchurn."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fedchurn." + name for name in ("server", "clients", "shared")}
    for init in (REPO / "fedchurn").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO).parts))
    assert found == listed


def test_flower_components_load_from_this_repo() -> None:
    from fedchurn.clients.app import app as client_app
    from fedchurn.server.app import app as server_app

    assert type(server_app).__name__ == "ServerApp"
    assert type(client_app).__name__ == "ClientApp"


def test_console_script_is_installed_and_runs() -> None:
    script = shutil.which("fedchurn") or pytest.fail("no 'fedchurn' on PATH: install with pip install -e .")
    result = subprocess.run([script, "config", "show"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0
    assert "privacy:" in result.stdout
