"""The simulation's warm-up: before round 1, every node is sent an empty query and answers it when ready.

Each institution's worker then prepares its rows and warms torch (clients/warmup.py), so round 1 measures what
later rounds measure. Replies are never read: a reply's content, error or absence changes nothing but the count
logged. The wait is bounded (``timeout``); nodes that never answer only leave round 1 slower.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

WARM_UP_GROUP = "warm-up"


def wait_for_nodes(grid: Grid, *, expected: int, timeout: float, poll_s: float = 0.1) -> list[int]:
    """The node ids online once ``expected`` are (or when ``timeout`` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(poll_s)
    return nodes


def warm_up_nodes(grid: Grid, *, expected: int, timeout: float) -> int:
    """Send every node an empty warm-up query and wait (at most ``timeout`` s) for the replies; returns how many
    answered. Nothing of any reply is read beyond its arrival."""
    deadline = time.monotonic() + timeout
    nodes = wait_for_nodes(grid, expected=expected, timeout=timeout)
    messages = [
        Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, group_id=WARM_UP_GROUP)
        for node in nodes
    ]
    remaining = max(0.0, deadline - time.monotonic())
    answered = sum(1 for _ in grid.send_and_receive(messages, timeout=remaining)) if messages else 0
    logger.info("warm-up: %d of %d nodes answered", answered, len(nodes))
    return answered
