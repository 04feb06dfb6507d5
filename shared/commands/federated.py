"""The commands of a real federation (deploy/README.md), registered in ``shared/cli.py``."""

from __future__ import annotations

from shared.commands import federation_cmd, pki_cmd, run_cmd, stop_cmd, superlink_cmd, supernode_cmd

FEDERATION_COMMANDS = (run_cmd, pki_cmd, superlink_cmd, supernode_cmd, federation_cmd, stop_cmd)
