"""Rows as bytes: the canonical form a row's secret split coin and a dataset's fingerprint are computed from.

A row's canonical bytes depend on its values only (numeric cells as Python's shortest float repr, categorical
cells as text, blanks as null, then the label), never on its position in the file: adding, removing or
reordering other rows changes neither a row's coin nor, apart from the rows added or removed, the fingerprint.

The fingerprint (SHA-256 over the sorted SHA-256 digests of the rows) names "these rows" in a bank's ledger: its
lifetime ε composes every mechanism it ran on rows with that fingerprint. For a CSV file the fingerprint is taken
over the file's raw records (:func:`file_fingerprint`), not over the columns a run's schema picks: a server that
sends another schema cannot make the same customers look like a new dataset with a fresh budget.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

from fedchurn.shared.errors import DataError
from fedchurn.shared.raw_table import RawTable

__all__ = ["file_fingerprint", "row_bytes", "rows_fingerprint", "table_fingerprint"]


def _number(value: float) -> str | None:
    return None if math.isnan(value) else repr(float(value))


def row_bytes(table: RawTable) -> list[bytes]:
    """Each row's canonical bytes: JSON of [numeric cells, categorical cells, label], position-free."""
    labels = table.labels.tolist() if table.labels is not None else [None] * table.n_rows
    numeric = table.numeric.tolist()
    categorical = table.categorical.tolist()
    out = []
    for i in range(table.n_rows):
        cells = [[_number(v) for v in numeric[i]], categorical[i], labels[i]]
        out.append(json.dumps(cells, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return out


def rows_fingerprint(rows: Iterable[bytes]) -> str:
    """SHA-256 over the sorted SHA-256 of each row: the same set (multiset) of rows, the same fingerprint."""
    digests = sorted(hashlib.sha256(row).digest() for row in rows)
    total = hashlib.sha256(b"fedchurn-rows-v1\n")
    for digest in digests:
        total.update(digest)
    return total.hexdigest()


def table_fingerprint(table: RawTable) -> str:
    """The fingerprint of a parsed table (synthetic data, or rows without a file)."""
    return rows_fingerprint(row_bytes(table))


def file_fingerprint(path: str | Path) -> str:
    """The fingerprint of a CSV file's data records (every column, header excluded), whatever the schema."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            next(reader, None)  # the header names columns, it is no customer
            rows = (json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") for record in reader)
            return rows_fingerprint(rows)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot fingerprint the data file ({type(exc).__name__})", path=str(path)) from None
