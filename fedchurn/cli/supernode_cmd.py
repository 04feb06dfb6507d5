"""`fedchurn supernode`: one institution's SuperNode, with its own data, key and state folder."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

from fedchurn.deployment.federation import (
    DEFAULT_SUPERNODE_RUNTIME_PORT,
    FederationError,
    flower_environment,
    wait_for_superlink,
)
from fedchurn.deployment.flower_processes import SuperNodeSpec, supernode_command

# Node-config keys the bank's ClientApp reads (clients/institution.py: NODE_POLICY, NODE_LEDGER_KEY).
NODE_POLICY = "policy"
NODE_LEDGER_KEY = "ledger-key"


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
        "--policy",
        help="this bank's privacy policy (YAML, checked now); without it the conservative built-in policy applies",
    )
    parser.add_argument(
        "--ledger-key",
        help="private key (0600) that signs this bank's privacy ledger, e.g. the --key file; without it a key is "
        "created once in --state-dir",
    )
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
    spec, command = command_for(args)
    wait_for_superlink(spec.superlink, spec.ca_cert, wait_s=args.wait)
    print(f"{spec.institution}: joining {spec.superlink} (TLS verified with {spec.ca_cert})")
    sys.stdout.flush()
    os.execve(command[0], command, flower_environment())  # this process becomes the SuperNode


def command_for(args: argparse.Namespace) -> tuple[SuperNodeSpec, list[str]]:
    """The checked SuperNode command of ``fedchurn supernode ARGS`` (nothing started)."""
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
    command = bank_command(
        supernode_command(spec),
        policy=Path(args.policy) if args.policy else None,
        ledger_key=Path(args.ledger_key) if args.ledger_key else None,
    )
    return spec, command


def bank_command(command: list[str], *, policy: Path | None, ledger_key: Path | None) -> list[str]:
    """The SuperNode command with the bank's policy file and ledger key added to its ``--node-config``.

    Both files are checked here, before the SuperNode joins: a policy that does not load, or a ledger key that
    is not a private EC key readable by its owner only, stops the bank now rather than at its first round.
    """
    from fedchurn.shared.ledger_signing import load_signer
    from fedchurn.shared.policy import load_policy

    extra: list[tuple[str, Path]] = []
    if policy is not None:
        load_policy(policy)  # ConfigError naming the policy key, the value and the rule
        extra.append((NODE_POLICY, policy.resolve()))
    if ledger_key is not None:
        if not ledger_key.is_file():
            raise FederationError(f"ledger signing key not found at {ledger_key} (--ledger-key)")
        mode = stat.S_IMODE(ledger_key.stat().st_mode)
        if mode & 0o077:
            raise FederationError(
                f"{ledger_key} has permissions {oct(mode)}: a private key must be 0600 (chmod 600 {ledger_key})"
            )
        load_signer(ledger_key, "bank")  # SigningError when it is no unencrypted EC private key
        extra.append((NODE_LEDGER_KEY, ledger_key.resolve()))
    if not extra:
        return command
    for key, path in extra:
        if "'" in str(path) or '"' in str(path):
            raise FederationError(f"{key} path {str(path)!r} contains a quote, which --node-config cannot carry")
    where = command.index("--node-config") + 1
    added = " ".join(f"{key}='{path}'" for key, path in extra)
    return [*command[:where], f"{command[where]} {added}", *command[where + 1 :]]
