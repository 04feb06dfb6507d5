"""`fedchurn supernode`: one institution's SuperNode, with its own data, key and state folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from shared.federation import (
    DEFAULT_SUPERNODE_RUNTIME_PORT,
    SuperNodeSpec,
    flower_environment,
    supernode_command,
    wait_for_superlink,
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "supernode",
        help="start an institution's SuperNode (run at the bank)",
        description="Checks the key, the CA, the data file and that the SuperLink answers over TLS, then runs "
        "flower-supernode in this process. Rows never leave this machine; the head and the privacy accountant are "
        "kept in --state-dir.",
    )
    parser.add_argument("--institution", required=True, help="this institution's name in the consortium")
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--ca", required=True, help="the consortium CA certificate (ca.crt)")
    parser.add_argument("--key", required=True, help="this institution's private key (node-auth.key)")
    parser.add_argument("--data", required=True, help="this institution's customer CSV")
    parser.add_argument("--state-dir", required=True, help="where the head and privacy accounting are kept")
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=DEFAULT_SUPERNODE_RUNTIME_PORT,
        help="local port of the SuperNode's own Runtime API (one per SuperNode on a machine)",
    )
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the SuperLink to answer first")
    parser.add_argument("--max-retries", type=int, default=30, help="reconnection attempts before giving up")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds of reconnecting before giving up")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    spec = SuperNodeSpec(
        institution=args.institution,
        superlink=args.superlink,
        ca_cert=Path(args.ca),
        private_key=Path(args.key),
        data_path=Path(args.data),
        state_dir=Path(args.state_dir),
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        max_wait_s=args.max_wait,
    )
    command = supernode_command(spec)
    wait_for_superlink(spec.superlink, spec.ca_cert, wait_s=args.wait)
    print(f"{spec.institution}: joining {spec.superlink} (TLS verified with {spec.ca_cert})")
    sys.stdout.flush()
    os.execve(command[0], command, flower_environment())  # this process becomes the SuperNode
