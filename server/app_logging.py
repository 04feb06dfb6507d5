"""Logging in the processes Flower starts for an app (``flwr run``): the app's edge configures it, once.

There the program is Flower's: its ``flwr`` logger has a console handler and the root logger has none. fedchurn's
records (``fedchurn.progress``: one line per round; warnings of every module) are handed to that same handler, so
they appear once, in Flower's format, among Flower's own lines.
"""

from __future__ import annotations

import logging


def log_through_flower() -> None:
    """Route ``fedchurn`` records to Flower's console handler(s). A no-op where fedchurn's logging is already
    configured (the ``fedchurn`` command, which also runs the ServerApp of a simulation in its own process)."""
    package = logging.getLogger("fedchurn")
    flower = logging.getLogger("flwr")
    if package.handlers or not flower.handlers:
        return
    for handler in flower.handlers:
        package.addHandler(handler)
    package.propagate = False  # never printed a second time by a handler on the root logger
    if package.level == logging.NOTSET:
        package.setLevel(logging.WARNING)
    logging.getLogger("fedchurn.progress").setLevel(logging.INFO)
