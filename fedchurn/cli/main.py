"""The `fedchurn` command. Parses arguments, calls the library, prints results. Errors: one line, no traceback.

Each command lives in its own module under ``fedchurn/cli`` and registers itself in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from fedchurn.cli import audit_cmd, config_cmd, privacy_cmd, report_cmd, runs_cmd, simulate, split_cmd
from fedchurn.cli.federated import FEDERATION_COMMANDS
from fedchurn.cli.transfer import TRANSFER_COMMANDS
from fedchurn.shared.errors import FedChurnError

EXIT_USER_ERROR = 2
COMMANDS = (
    simulate,
    runs_cmd,
    split_cmd,
    config_cmd,
    privacy_cmd,
    audit_cmd,
    report_cmd,
    *FEDERATION_COMMANDS,
    *TRANSFER_COMMANDS,
)


VERSION_OF = ("fedchurn", "flwr", "torch", "opacus", "ray")  # this package, then the libraries a run depends on


def version_text() -> str:
    """``fedchurn 0.1.0 (flwr 1.42.0, torch 2.13.0, ...)``: read from the installed packages' metadata, so asking
    for it imports none of them."""

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    own, *libraries = VERSION_OF
    return f"{own} {installed(own)} ({', '.join(f'{name} {installed(name)}' for name in libraries)})"


class HelpFormatter(argparse.HelpFormatter):
    """Every option that has a default shows it: ``(default: 3)`` is appended to help that does not already say
    what the default is. Options without one (None), flags (False) and empty lists show nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or default in ("", [], ())
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """The parser of every command and action: subparsers are made with the class of their parent
    (argparse's ``add_subparsers``), so they all show defaults the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedchurn",
        description="Federated transfer learning for bank churn: shared encoder, local heads, DP-SGD.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def _setup_logging(verbose: bool) -> None:
    """Logging is configured here, once; library modules only get loggers. Every record is printed by exactly one
    handler: ``fedchurn.progress`` (one line per round) by its own, the rest of ``fedchurn`` by another; neither
    propagates to the root logger, where a library's handler could print it again. Flower's and Ray's loggers keep
    their own handlers. Safe to call again (tests call ``main`` many times): handlers are replaced, not added."""
    progress = logging.getLogger("fedchurn.progress")
    _replace_handler(progress, logging.Formatter("%(message)s"))
    progress.setLevel(logging.INFO)
    progress.propagate = False
    package = logging.getLogger("fedchurn")
    _replace_handler(package, logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package.setLevel(logging.INFO if verbose else logging.WARNING)
    package.propagate = False


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler this module installs (so that a second call can find and replace it)."""


def _replace_handler(logger: logging.Logger, formatter: logging.Formatter) -> None:
    for old in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(old)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(formatter)
    logger.addHandler(handler)


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
