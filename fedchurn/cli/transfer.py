"""The transfer-learning commands, registered together: pretrain, compare, predict."""

from __future__ import annotations

from fedchurn.cli import compare, predict, pretrain

TRANSFER_COMMANDS = (pretrain, compare, predict)
