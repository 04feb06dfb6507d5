"""`fedchurn federation connect|register|nodes|demo-data`: the operator's side of a real federation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedchurn.deployment.federation import (
    default_flwr_home,
    list_nodes,
    register_node,
    wait_for_superlink,
    write_connection,
)
from fedchurn.deployment.members import read_members
from fedchurn.deployment.pki import check_pem_certificate
from fedchurn.shared.config import SyntheticConfig


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "federation",
        help="connect to a SuperLink, register institutions' keys, list nodes, write demo data",
        description="Connections live in $FLWR_HOME/config.toml (default ~/.flwr), where the flwr CLI reads them.",
    )
    actions = parser.add_subparsers(dest="federation_command", required=True, metavar="ACTION")
    connect = actions.add_parser("connect", help="add a SuperLink connection (TLS) and check that it answers")
    connect.add_argument("name", help="the connection's name, e.g. consortium")
    connect.add_argument("--address", required=True, help="the SuperLink's HOST:PORT")
    connect.add_argument("--ca", required=True, help="the consortium CA certificate")
    connect.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the SuperLink to answer")
    reg = actions.add_parser("register", help="register an institution's public key (node authentication)")
    reg.add_argument("name", help="the connection's name")
    reg.add_argument("--key", required=True, help="the institution's node-auth.pub")
    reg.add_argument(
        "--institution",
        required=True,
        help="the institution this key belongs to: replies from its node must carry this name",
    )
    reg.add_argument("--node-id", type=int, help="the node id of a key the SuperLink registered earlier")
    nodes = actions.add_parser("nodes", help="list the SuperLink's nodes and whether they are online")
    nodes.add_argument("name", help="the connection's name")
    demo = actions.add_parser("demo-data", help="write synthetic customer CSVs, one folder per bank (for a demo)")
    demo.add_argument("--out", required=True, help="folder: OUT/bank-01/customers.csv, ...")
    demo.add_argument(
        "--institutions",
        type=int,
        default=SyntheticConfig().institutions,  # the one default: the same consortium `fedchurn simulate` runs
        help="number of banks",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic consortium")
    for sub in (connect, reg, nodes):
        sub.add_argument("--flwr-home", help="Flower's config folder (default: $FLWR_HOME or ~/.flwr)")
    parser.set_defaults(handler=run)


def _flwr_home(args: argparse.Namespace) -> Path:
    return Path(args.flwr_home).expanduser().resolve() if args.flwr_home else default_flwr_home()


def run(args: argparse.Namespace) -> int:
    action = args.federation_command
    if action == "connect":
        ca = Path(args.ca).expanduser().resolve()
        # Check first, write after: a failed connect never replaces a working connection (or its CA).
        check_pem_certificate(ca, "consortium CA certificate")
        wait_for_superlink(args.address, ca, wait_s=args.wait)
        path = write_connection(_flwr_home(args), args.name, address=args.address, ca_cert=ca)
        print(f"Federation '{args.name}' -> {args.address} (TLS verified with {ca}); saved in {path}")
    elif action == "register":
        flwr_home = _flwr_home(args)
        node_id = register_node(flwr_home, args.name, Path(args.key), name=args.institution, node_id=args.node_id)
        members = read_members(flwr_home, args.name)
        node_of = next(node for node, name in members.items() if name == args.institution)
        state = "already registered" if node_id is None else "registered"
        print(f"{args.institution}: {state} as node {node_of}; {len(members)} institution(s) in the member registry")
    elif action == "nodes":
        for node in list_nodes(_flwr_home(args), args.name):
            print(f"{node.get('node-id'):>22}  {node.get('status', '?'):<10}  since {node.get('online-at', 'N/A')}")
    else:
        _demo_data(Path(args.out), institutions=args.institutions, seed=args.seed)
    return 0


def _demo_data(out: Path, *, institutions: int, seed: int) -> None:
    from fedchurn.shared.institution_rows import write_csv
    from fedchurn.shared.synthetic_consortium import generate_synthetic_institution

    synthetic = SyntheticConfig(institutions=institutions)
    for index in range(institutions):
        table = generate_synthetic_institution(synthetic, index, seed=seed)
        path = out / table.institution / "customers.csv"
        write_csv(table, path)
        print(f"{table.institution}: {table.n_rows} customers -> {path}")
