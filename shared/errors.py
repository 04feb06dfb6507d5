"""One small error hierarchy. Every message names what is wrong, where, and how to fix it.

The CLI catches ``FedChurnError`` and prints its message without a traceback; anything else is a bug.
"""

from __future__ import annotations

from typing import Any


class FedChurnError(Exception):
    """Base class: a problem the user can fix (bad config, bad data, bad checkpoint, ...)."""


class ConfigError(FedChurnError):
    """A configuration key holds a value that breaks a rule."""

    def __init__(self, key: str, value: Any, rule: str, fix: str | None = None) -> None:
        self.key = key
        self.value = value
        self.rule = rule
        self.fix = fix
        message = f"config key '{key}' = {value!r}: {rule}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class DataError(FedChurnError):
    """A data file breaks the declared schema. Names the file, the line and the column where known."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = path
        self.line = line
        self.column = column
        self.fix = fix
        where = []
        if path is not None:
            where.append(f"file {path}")
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        message = (", ".join(where) + ": " if where else "") + problem
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class CheckpointError(FedChurnError):
    """A model checkpoint cannot be used: unreadable, wrong format, or keys/shapes that do not match."""


class PrivacyError(FedChurnError):
    """A privacy setting or accountant state that cannot give the promised guarantee."""


class SimulationError(FedChurnError):
    """The federation could not be started or did not finish."""
