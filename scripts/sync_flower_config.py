"""Rewrite pyproject.toml's [tool.flwr.app.config] from the embedded default config.

Run after changing the default config or the schema: `python scripts/sync_flower_config.py`.
tests/test_config.py fails while the two differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedchurn.shared.config import config_to_run_config, default_config

HEADER = "[tool.flwr.app.config]\n"
NEXT_SECTION = "\n# --- quality"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    start = text.index(HEADER) + len(HEADER)
    end = text.index(NEXT_SECTION, start)
    lines = [f"{key} = {_toml_value(value)}" for key, value in config_to_run_config(default_config()).items()]
    path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
