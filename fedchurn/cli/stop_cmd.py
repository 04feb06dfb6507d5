"""`fedchurn stop PIDFILE...`: end the processes a `fedchurn superlink`/`supernode` command started, by id."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedchurn.deployment.processes import alive, command_line, end_tree

# A pid file must name one of our processes: a recycled pid of someone else's process is never signalled.
OURS = ("fedchurn", "flower-superlink", "flower-supernode", "flwr")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "stop",
        help="stop a SuperLink or SuperNode started with its pid written to a file, and every process it started",
        description="Reads each pid file, ends that process and its descendants (Flower's SuperExec and app "
        "processes) by id — SIGTERM, then SIGKILL after --grace seconds — and removes the pid file. Processes of "
        "other commands or users are never touched.",
    )
    parser.add_argument("pid_files", nargs="+", metavar="PIDFILE", help="a file holding the process id ($!)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--kill", action="store_true", help="SIGKILL at once (to play a crash in a drill)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    failures = 0
    for name in args.pid_files:
        path = Path(name)
        try:
            pid = int(path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            print(f"{path}: not a readable pid file; nothing stopped")
            failures += 1
            continue
        if not alive(pid):
            print(f"{path}: process {pid} is not running")
            path.unlink(missing_ok=True)
            continue
        command = command_line(pid)
        if not any(word in command for word in OURS):
            print(f"{path}: process {pid} is not a fedchurn or Flower process ({command[:80]!r}); left alone")
            failures += 1
            continue
        ended = end_tree(pid, grace_s=args.grace, kill_at_once=args.kill)
        print(f"{path}: stopped process {pid} and {len(ended) - 1} process(es) it started")
        path.unlink(missing_ok=True)
    return 1 if failures else 0
