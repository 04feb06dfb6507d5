"""`fedchurn config show|check`."""

from __future__ import annotations

import argparse
from typing import Any

from fedchurn.shared.config import DEFAULT_CONFIG_YAML, dump_config, load_config


def register(commands: Any) -> None:
    cfg = commands.add_parser("config", help="show or check configs")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cfg_commands.add_parser("show", help="print the embedded default config (a template to edit)")
    check = cfg_commands.add_parser("check", help="validate a config file and print it resolved")
    check.add_argument("config")
    cfg.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.config_command == "show":
        print(DEFAULT_CONFIG_YAML, end="")
        return 0
    config = load_config(args.config)
    print(dump_config(config), end="")
    return 0
