"""Config YAML as a person would keep it: the user's values in the layout of the commented embedded default.

``commented_yaml`` writes every key of a config's plain form in its own order, each section as a block and every
other value in YAML flow style on its key's line, and carries over the comment each key has in the template
(``DEFAULT_CONFIG_YAML``): the comment on its line, and the comment lines that follow it. Keys the template does
not list are written without a comment. PyYAML alone (no round-trip YAML library): the template is ours, one key
per line, so its comments are found by indentation; the values themselves are always written by PyYAML.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HEADER = (
    "# fedchurn config. Comments: the embedded default's (fedchurn config show); relative paths are relative to "
    "this file."
)
COMMENT_COLUMN = 29  # where the template's comments start


@dataclass
class _Comments:
    inline: dict[tuple[str, ...], str] = field(default_factory=dict)  # key path -> "# ..." on its line
    after: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # key path -> comment lines below it


def template_comments(template: str) -> _Comments:
    """The template's comments by key path. A line ``key: value  # text`` gives ``inline``; comment-only lines
    right after a key's line (indented deeper than the key) give ``after``."""
    comments = _Comments()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    last: tuple[str, ...] | None = None
    for line in template.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            if last is not None:
                comments.after.setdefault(last, []).append(line)
            continue
        key, sep, rest = stripped.partition(":")
        if not sep:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), key.strip())
        stack.append((indent, key.strip()))
        last = path
        hash_at = _comment_start(rest)
        if hash_at is not None:
            comments.inline[path] = rest[hash_at:].strip()
    return comments


def _comment_start(rest: str) -> int | None:
    """Index of a ``#`` that starts a comment in the text after ``key:`` (not inside quotes)."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return i
    return None


def _flow(value: Any) -> str:
    """One value on one line, exactly as PyYAML reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True, sort_keys=False)
    if text.endswith("\n...\n"):  # a plain scalar document
        text = text[: -len("\n...\n")]
    return text.strip()


def commented_yaml(
    values: Mapping[str, Any],
    *,
    template: str,
    is_free_mapping: Callable[[list[str]], bool],
) -> str:
    """YAML for ``values`` (a config's plain form) with the template's comments. A mapping is a block when it is
    a section of the schema, flow style when its keys are the user's names (``is_free_mapping``)."""
    comments = template_comments(template)
    lines = [HEADER]

    def emit(mapping: Mapping[str, Any], path: tuple[str, ...]) -> None:
        indent = "  " * len(path)
        for key, value in mapping.items():
            here = (*path, key)
            block = isinstance(value, Mapping) and bool(value) and not is_free_mapping(list(here))
            line = f"{indent}{key}:" if block else f"{indent}{key}: {_flow(value)}"
            inline = comments.inline.get(here)
            if inline:
                line = f"{line.ljust(COMMENT_COLUMN - 1)} {inline}"
            lines.append(line)
            lines.extend(comments.after.get(here, []))
            if block:
                emit(value, here)

    emit(values, ())
    return "\n".join(lines) + "\n"


def relative_path(path: str | None, *, folder: Path) -> str | None:
    """``path`` relative to ``folder`` when the two share a folder below the file system's root (a run folder
    and its data in one project), else unchanged: ``load_config`` resolves it against the file's folder again."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if not target.is_absolute():
        return path
    base = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(target))
    common = Path(os.path.commonpath([base, real]))
    if common == Path(common.anchor):
        return path
    return os.path.relpath(real, base)
