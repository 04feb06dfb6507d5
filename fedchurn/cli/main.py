"""The `fedchurn` command. Parses arguments, calls the library, prints results. Errors: one line, no traceback.

Each command lives in its own module under ``fedchurn/cli`` and registers itself in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedchurn.cli import audit_cmd, config_cmd, privacy_cmd, report_cmd, simulate
from fedchurn.cli.federated import FEDERATION_COMMANDS
from fedchurn.cli.transfer import TRANSFER_COMMANDS
from fedchurn.shared.errors import FedChurnError

EXIT_USER_ERROR = 2
COMMANDS = (simulate, config_cmd, privacy_cmd, audit_cmd, report_cmd, *FEDERATION_COMMANDS, *TRANSFER_COMMANDS)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedchurn",
        description="Federated transfer learning for bank churn: shared encoder, local heads, DP-SGD.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress = logging.getLogger("fedchurn.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("server", "clients", "shared"):
        logger = logging.getLogger(name)
        logger.addHandler(warnings)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return int(args.handler(args))
    except FedChurnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
