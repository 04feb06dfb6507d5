"""Type-check the whole ``fedchurn`` import name with mypy.

mypy finds modules by folder, and the Flower apps live in the top-level folders ``server/``, ``clients/`` and
``shared/`` while they import as ``fedchurn.server``, ``fedchurn.clients`` and ``fedchurn.shared``. This script
lays out that import tree with symbolic links under ``build/typecheck`` and runs mypy on it with the project's
settings. Usage: ``python scripts/typecheck.py`` (extra arguments go to mypy).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("server", "clients", "shared")


def main() -> int:
    tree = ROOT / "build" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "fedchurn"
    package.mkdir(parents=True)
    for entry in (ROOT / "fedchurn").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in APP_PACKAGES:
        (package / name).symlink_to(ROOT / name)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "fedchurn"]
    return subprocess.call([*command, *sys.argv[1:]], cwd=tree)


if __name__ == "__main__":
    sys.exit(main())
