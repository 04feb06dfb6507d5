"""Process trees by id (Linux /proc; stdlib only): end exactly the processes a command started, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")


def _parents() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    if not PROC.is_dir():
        return tree
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first, then theirs)."""
    tree, found, todo = _parents(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def end_tree(pid: int, *, grace_s: float = 10.0, kill_at_once: bool = False) -> list[int]:
    """SIGTERM ``pid`` and every descendant (SIGKILL with ``kill_at_once``); SIGKILL what is left after
    ``grace_s``. The tree is read first, so children that a dying parent leaves behind are ended too.
    Returns the ids that were signalled."""
    tree = [pid, *descendants(pid)]
    first = signal.SIGKILL if kill_at_once else signal.SIGTERM
    for member in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, first)
    deadline = time.monotonic() + grace_s
    while any(alive(member) for member in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in tree:
        if alive(member):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGKILL)
    return tree
