"""The commands of a real federation (deploy/README.md), registered in ``fedchurn/cli/main.py``."""

from __future__ import annotations

from fedchurn.cli import federation_cmd, pki_cmd, run_cmd, stop_cmd, superlink_cmd, supernode_cmd

FEDERATION_COMMANDS = (run_cmd, pki_cmd, superlink_cmd, supernode_cmd, federation_cmd, stop_cmd)
