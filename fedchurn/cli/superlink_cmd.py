"""`fedchurn superlink`: the consortium's SuperLink, with TLS, node authentication and a persistent database."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fedchurn.deployment.federation import DEFAULT_SUPERLINK_PORT, flower_environment
from fedchurn.deployment.flower_processes import SuperLinkSpec, superlink_command


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "superlink",
        help="start the SuperLink (TLS, node authentication, persistent state)",
        description="Checks the TLS files and the port, then runs flower-superlink in this process. Only "
        "SuperNodes whose public key was registered (fedchurn federation register) may join.",
    )
    parser.add_argument("--tls", required=True, help="folder with server.pem, server.key, ca.crt (fedchurn pki server)")
    parser.add_argument("--database", required=True, help="SQLite file: runs and registered nodes survive restarts")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT, help="the Fleet API port banks connect to")
    parser.add_argument("--log-file", help="also write the SuperLink's log here")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    spec = SuperLinkSpec(
        tls_dir=Path(args.tls),
        database=Path(args.database).expanduser().resolve(),
        host=args.host,
        port=args.port,
        log_file=Path(args.log_file) if args.log_file else None,
    )
    command = superlink_command(spec)
    print(f"SuperLink on https://{args.host}:{args.port} (TLS, node authentication, state in {spec.database})")
    sys.stdout.flush()
    os.execve(command[0], command, flower_environment())  # this process becomes the SuperLink
