"""The consortium's member registry: which institution each registered node key belongs to (stdlib only).

The SuperLink authenticates a SuperNode by its registered public key and gives it a node id; every reply's
metadata carries that node id, which a member cannot choose. The operator records, when registering a bank's
key, the institution it belongs to. ``fedchurn run`` sends the mapping node id -> institution with the run
(``federation.members``), and the server refuses a reply whose institution is not the one registered for its node.

The registry lives next to Flower's connections, in ``$FLWR_HOME/fedchurn-members.json``, one section per
connection: ``{connection: {node_id: {"institution": NAME, "public_key_sha256": HEX}}}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedchurn.shared.config import INSTITUTION_NAME_RULE, is_valid_institution_name
from fedchurn.shared.errors import FedChurnError

MEMBERS_FILE = "fedchurn-members.json"


class RegistryError(FedChurnError):
    """The member registry cannot be read or would become ambiguous."""


def key_fingerprint(public_key: Path) -> str:
    return hashlib.sha256(public_key.read_bytes().strip()).hexdigest()


def _path(flwr_home: Path) -> Path:
    return flwr_home / MEMBERS_FILE


def _load(flwr_home: Path) -> dict[str, Any]:
    path = _path(flwr_home)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc}); restore it from a backup or re-register") from None
    if not isinstance(values, dict):
        raise RegistryError(f"{path} must hold a JSON object of connections")
    return values


def read_members(flwr_home: Path, connection: str) -> dict[int, str]:
    """Node id -> institution registered for ``connection`` (empty when none was)."""
    section = _load(flwr_home).get(connection, {})
    members: dict[int, str] = {}
    for node, entry in section.items() if isinstance(section, dict) else ():
        name = entry.get("institution") if isinstance(entry, dict) else None
        if not str(node).isdigit() or not isinstance(name, str) or not is_valid_institution_name(name):
            raise RegistryError(f"{_path(flwr_home)}: entry {node!r} of {connection!r} is malformed; re-register it")
        members[int(node)] = name
    return members


def node_of_key(flwr_home: Path, connection: str, public_key: Path) -> int | None:
    """The node id recorded for this public key, if any."""
    fingerprint = key_fingerprint(public_key)
    section = _load(flwr_home).get(connection, {})
    for node, entry in section.items() if isinstance(section, dict) else ():
        if isinstance(entry, dict) and entry.get("public_key_sha256") == fingerprint:
            return int(node)
    return None


def record_member(flwr_home: Path, connection: str, *, node_id: int, institution: str, public_key: Path) -> None:
    """Bind ``node_id`` (the key's node) to ``institution``; refuses to rebind either to something else."""
    if not is_valid_institution_name(institution):
        raise RegistryError(f"institution name {institution!r}: {INSTITUTION_NAME_RULE}")
    values = _load(flwr_home)
    section = values.setdefault(connection, {})
    fingerprint = key_fingerprint(public_key)
    for node, entry in section.items():
        same_node = int(node) == node_id
        if same_node and entry.get("institution") != institution:
            raise RegistryError(
                f"node {node_id} is already registered as {entry.get('institution')!r}, not {institution!r}"
            )
        if not same_node and entry.get("institution") == institution:
            raise RegistryError(
                f"{institution!r} is already registered as node {node}: one institution, one key. Remove the old "
                f"key first (flwr supernode unregister {node} {connection}) and its entry in {_path(flwr_home)}"
            )
    section[str(node_id)] = {"institution": institution, "public_key_sha256": fingerprint}
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a crash never leaves half a registry.
    handle, temporary = tempfile.mkstemp(dir=flwr_home, prefix=".members-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(values, file, indent=2, sort_keys=True)
    os.replace(temporary, _path(flwr_home))
