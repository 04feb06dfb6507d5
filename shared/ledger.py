"""Append-only, hash-chained privacy ledgers (stdlib only: the server and the institutions both use it).

Every entry's hash is ``sha256(previous hash + "\\n" + canonical JSON of the entry's record)``; the first entry
chains to :data:`GENESIS`. Editing a record, deleting one, or reordering them breaks the chain at that entry, and
:func:`verify_chain` names it. Removing entries from the *end* leaves a valid shorter chain: the audit catches
that by comparing the ledger with what the institution's state and the consortium's record say it trained.

Two stores share the chain:

- :class:`InstitutionLedger` — SQLite (``ledger.sqlite`` in the institution's own folder), one entry per round
  the institution trained. Triggers refuse UPDATE and DELETE, so an honest mistake cannot rewrite history; a
  deliberate edit (dropping the triggers) still breaks the chain.
- :class:`JsonlChain` — one JSON line per entry; the server's record of what each institution reported.

Beside its chain an institution ledger keeps, append-only too, the bank's own signature of each entry hash and
the consortium's countersignature of it (``shared/ledger_signing.py`` makes and checks them; this module stores
them and stays stdlib-only).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedchurn.shared.errors import FedChurnError

__all__ = [
    "CONSORTIUM_LEDGER_FILE",
    "GENESIS",
    "LEDGER_FILE",
    "ChainEntry",
    "ChainProblem",
    "InstitutionLedger",
    "JsonlChain",
    "LedgerError",
    "SignedHash",
    "canonical_json",
    "entry_hash",
    "verify_chain",
]

LEDGER_FILE = "ledger.sqlite"  # in each institution's own folder
CONSORTIUM_LEDGER_FILE = "consortium_ledger.jsonl"  # in the server's output folder
GENESIS = "0" * 64
SCHEMA_VERSION = 1


class LedgerError(FedChurnError):
    """A ledger that cannot be read or written."""


@dataclass(frozen=True)
class SignedHash:
    """A record hash, a signature over it (base64 DER ECDSA) and the signer's public key (PEM)."""

    record_hash: str
    signature: str
    public_key: str

    def to_wire(self) -> dict[str, Any]:
        return {"record-hash": self.record_hash, "signature": self.signature, "public-key": self.public_key}

    def to_text(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))


def _plain(value: Any) -> Any:
    """JSON has no infinity or NaN: non-finite floats are stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def canonical_json(record: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 text, floats as Python's shortest round-trip repr."""
    return json.dumps(_plain(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(prev_hash: str, record_json: str) -> str:
    return hashlib.sha256((prev_hash + "\n" + record_json).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainEntry:
    """One stored entry: its position, the record's canonical JSON, and the two hashes."""

    seq: int
    record_json: str
    prev_hash: str
    hash: str

    @property
    def record(self) -> dict[str, Any]:
        value = json.loads(self.record_json)
        if not isinstance(value, dict):
            raise LedgerError(f"ledger entry {self.seq}: record is not a JSON object")
        return value


@dataclass(frozen=True)
class ChainProblem:
    seq: int  # the entry (its stored position) where the chain breaks
    problem: str

    def __str__(self) -> str:
        return f"record {self.seq}: {self.problem}"


def verify_chain(entries: Sequence[ChainEntry]) -> list[ChainProblem]:
    """Every break in the chain, each naming the entry; empty when the chain is intact.

    Checked per entry: positions run 1, 2, 3, ... (a gap is a deletion); the record names its own position
    (a moved record is a reordering); the stored hash is the hash of the stored record (an edit); and it chains
    to the previous entry's hash (a deletion or reordering before it).
    """
    problems: list[ChainProblem] = []
    previous = GENESIS
    previous_seq = 0
    for entry in entries:
        if entry.seq != previous_seq + 1:
            problems.append(
                ChainProblem(entry.seq, f"position {entry.seq} follows {previous_seq}: a record was deleted")
            )
        previous_seq = entry.seq
        try:
            record = entry.record
        except (json.JSONDecodeError, LedgerError):
            problems.append(ChainProblem(entry.seq, "the record is not valid JSON: it was edited"))
            previous = entry.hash
            continue
        if record.get("seq") != entry.seq:
            problems.append(
                ChainProblem(
                    entry.seq,
                    f"the record says it is record {record.get('seq')!r}: records were reordered or moved",
                )
            )
        if entry_hash(entry.prev_hash, entry.record_json) != entry.hash:
            problems.append(ChainProblem(entry.seq, "its hash does not match its content: the record was edited"))
        if entry.prev_hash != previous:
            problems.append(
                ChainProblem(
                    entry.seq,
                    "it does not chain to the record before it: a record before it was deleted, edited or moved",
                )
            )
        previous = entry.hash
    return problems


def _stamp(record: Mapping[str, Any], seq: int, prev_hash: str) -> ChainEntry:
    body = {**record, "seq": seq}
    text = canonical_json(body)
    return ChainEntry(seq=seq, record_json=text, prev_hash=prev_hash, hash=entry_hash(prev_hash, text))


# --------------------------------------------------------------------------------------------------
# The institution's ledger: SQLite on its own disk
# --------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS signatures (
    seq INTEGER PRIMARY KEY, record_hash TEXT NOT NULL, signature TEXT NOT NULL, public_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS countersignatures (
    seq INTEGER PRIMARY KEY, record_hash TEXT NOT NULL, signature TEXT NOT NULL, public_key TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS signatures_no_update BEFORE UPDATE ON signatures
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS signatures_no_delete BEFORE DELETE ON signatures
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS countersignatures_no_update BEFORE UPDATE ON countersignatures
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS countersignatures_no_delete BEFORE DELETE ON countersignatures
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""
CONSORTIUM_KEY_META = "consortium_public_key"  # pinned at the first countersignature the bank accepts


class InstitutionLedger:
    """An institution's privacy ledger: ``folder/ledger.sqlite``, append-only, hash-chained."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_folder(cls, folder: Path) -> InstitutionLedger:
        return cls(folder / LEDGER_FILE)

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the privacy ledger {self.path}: {exc}") from None
        return connection

    def append(self, record: Mapping[str, Any], *, sign: Callable[[str], SignedHash] | None = None) -> ChainEntry:
        """Add one record at the end of the chain (atomically: concurrent writers cannot fork it).

        With ``sign``, the bank's signature of the new entry's hash is stored in the same transaction.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db:
                db.executescript(_SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("BEGIN IMMEDIATE")
                try:
                    last = db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
                    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                    entry = _stamp(record, seq, prev)
                    db.execute(
                        "INSERT INTO ledger (seq, record, prev_hash, hash) VALUES (?, ?, ?, ?)",
                        (entry.seq, entry.record_json, entry.prev_hash, entry.hash),
                    )
                    if sign is not None:
                        signed = sign(entry.hash)
                        db.execute(
                            "INSERT INTO signatures VALUES (?, ?, ?, ?)",
                            (entry.seq, signed.record_hash, signed.signature, signed.public_key),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot append to the privacy ledger {self.path}: {exc}") from None
        return entry

    def entries(self) -> list[ChainEntry]:
        """Every entry, in stored order (by position)."""
        if not self.path.is_file():
            return []
        try:
            with closing(self._connect()) as db:
                rows = db.execute("SELECT seq, record, prev_hash, hash FROM ledger ORDER BY seq").fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from None
        return [ChainEntry(seq=int(s), record_json=str(r), prev_hash=str(p), hash=str(h)) for s, r, p, h in rows]

    def verify(self) -> list[ChainProblem]:
        return verify_chain(self.entries())

    def _signed(self, table: str) -> dict[int, SignedHash]:
        if not self.path.is_file():
            return {}
        try:
            with closing(self._connect()) as db:
                exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
                rows = (
                    db.execute(f"SELECT seq, record_hash, signature, public_key FROM {table}").fetchall()
                    if exists
                    else []
                )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from None
        return {int(s): SignedHash(str(h), str(g), str(k)) for s, h, g, k in rows}

    def signatures(self) -> dict[int, SignedHash]:
        """The bank's own signature of each entry, by position."""
        return self._signed("signatures")

    def countersignatures(self) -> dict[int, SignedHash]:
        """The consortium's countersignature of each entry it received, by position."""
        return self._signed("countersignatures")

    def pinned_consortium_key(self) -> str | None:
        if not self.path.is_file():
            return None
        try:
            with closing(self._connect()) as db:
                exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
                row = (
                    db.execute("SELECT value FROM meta WHERE key=?", (CONSORTIUM_KEY_META,)).fetchone()
                    if exists
                    else None
                )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from None
        return None if row is None else str(row[0])

    def add_countersignature(self, signed: SignedHash) -> str | None:
        """Store a VERIFIED consortium countersignature beside the entry it covers; a reason when refused.

        Refused: no entry has that hash, the entry is already countersigned, or the key is not the consortium key
        pinned at the first countersignature (a server cannot swap its key half-way through the history).
        """
        if not self.path.is_file():
            return "the ledger holds no records"
        try:
            with closing(self._connect()) as db:
                db.executescript(_SCHEMA)
                db.execute("BEGIN IMMEDIATE")
                try:
                    row = db.execute("SELECT seq FROM ledger WHERE hash=?", (signed.record_hash,)).fetchone()
                    pinned = db.execute("SELECT value FROM meta WHERE key=?", (CONSORTIUM_KEY_META,)).fetchone()
                    done = (
                        row is not None
                        and db.execute("SELECT 1 FROM countersignatures WHERE seq=?", (row[0],)).fetchone()
                    )
                    reason = None
                    same = (
                        row is not None
                        and db.execute(
                            "SELECT 1 FROM countersignatures WHERE seq=? AND record_hash=? AND signature=? "
                            "AND public_key=?",
                            (row[0], signed.record_hash, signed.signature, signed.public_key),
                        ).fetchone()
                    )
                    if same:  # the same countersignature delivered again (train and evaluate both carry it)
                        db.execute("COMMIT")
                        return None
                    if row is None:
                        reason = "no record of this ledger has that hash"
                    elif done:
                        reason = "the record is already countersigned"
                    elif pinned is not None and pinned[0] != signed.public_key:
                        reason = "signed by a key other than the consortium key pinned at the first countersignature"
                    if reason is None:
                        if pinned is None:
                            db.execute("INSERT INTO meta VALUES (?, ?)", (CONSORTIUM_KEY_META, signed.public_key))
                        db.execute(
                            "INSERT INTO countersignatures VALUES (?, ?, ?, ?)",
                            (row[0], signed.record_hash, signed.signature, signed.public_key),  # type: ignore[index]
                        )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot store a countersignature in {self.path}: {exc}") from None
        return reason


# --------------------------------------------------------------------------------------------------
# The consortium's record: JSON lines, written by the server
# --------------------------------------------------------------------------------------------------


class JsonlChain:
    """A hash-chained JSON-lines file: ``{"seq", "prev_hash", "hash", "record"}`` per line."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        self._last_seq = 0
        self._last_hash = GENESIS
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")
        elif path.is_file():
            entries = self.entries()
            if entries:
                self._last_seq, self._last_hash = entries[-1].seq, entries[-1].hash

    def append(self, record: Mapping[str, Any]) -> ChainEntry:
        entry = _stamp(record, self._last_seq + 1, self._last_hash)
        line = json.dumps(
            {
                "seq": entry.seq,
                "prev_hash": entry.prev_hash,
                "hash": entry.hash,
                "record": json.loads(entry.record_json),
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self._last_seq, self._last_hash = entry.seq, entry.hash
        return entry

    def entries(self) -> list[ChainEntry]:
        return list(self._read())

    def _read(self) -> Iterator[ChainEntry]:
        if not self.path.is_file():
            return
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                yield ChainEntry(
                    seq=int(value["seq"]),
                    record_json=canonical_json(value["record"]),
                    prev_hash=str(value["prev_hash"]),
                    hash=str(value["hash"]),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise LedgerError(f"{self.path}, line {number}: not a ledger entry") from None

    def verify(self) -> list[ChainProblem]:
        return verify_chain(self.entries())
