"""`fedchurn pki ca|server|node`: the consortium's CA, the SuperLink's TLS certificate, an institution's key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedchurn.deployment.pki import certificate_hosts, create_ca, create_node_key, create_server_cert


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "pki",
        help="create the consortium CA, the SuperLink's TLS certificate, or an institution's node key",
        description="Security material for a real federation (see deploy/README.md). Private keys are written "
        "0600 in 0700 folders and never overwritten without --force.",
    )
    actions = parser.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    ca = actions.add_parser("ca", help="a new consortium CA (operator; keep ca.key offline)")
    ca.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    ca.add_argument("--name", default="fedchurn consortium CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="days the CA certificate stays valid")
    server = actions.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA")
    server.add_argument("--ca", required=True, help="the CA folder (ca.crt, ca.key)")
    server.add_argument("--out", required=True, help="folder for server.pem, server.key and a copy of ca.crt")
    server.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the SuperLink is reached at (repeatable; localhost and 127.0.0.1 always)",
    )
    server.add_argument("--days", type=int, default=825, help="days the server certificate stays valid")
    node = actions.add_parser("node", help="an institution's SuperNode authentication key pair (run at the bank)")
    node.add_argument("--institution", required=True)
    node.add_argument("--out", required=True, help="the institution's key folder (node-auth.key stays here)")
    for sub in (ca, server, node):
        sub.add_argument("--force", action="store_true", help="replace existing files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.pki_command == "ca":
        ca = create_ca(Path(args.out), name=args.name, days=args.days, overwrite=args.force)
        print(f"CA certificate: {ca.cert}  (give it to every institution)")
        print(f"CA key:         {ca.key}  (0600; keep it offline, it signs the SuperLink's certificate)")
    elif args.pki_command == "server":
        tls = create_server_cert(
            Path(args.ca), Path(args.out), hosts=tuple(args.host), days=args.days, overwrite=args.force
        )
        print(f"SuperLink certificate: {tls.cert} (valid for {', '.join(certificate_hosts(tls.cert))})")
        print(f"SuperLink key:         {tls.key} (0600)")
        print(f"CA certificate:        {tls.ca_cert}")
    else:
        node = create_node_key(Path(args.out), args.institution, overwrite=args.force)
        print(f"{node.institution}: private key {node.private_key} (0600; never leaves this folder)")
        print(f"{node.institution}: public key  {node.public_key} (send it to the operator to register)")
    return 0
