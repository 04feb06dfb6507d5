"""Columnar reading of customer tables (CSV or Parquet) with pyarrow, and the structural checks on the file.

A table is read once into Arrow columns of text (CSV) or typed values (Parquet); the checks on values are
column-wise (shared/table_checks.py). Line numbers follow the CSV file: the header is line 1, blank lines count,
a quoted value spanning lines counts every line. In a Parquet file there are no lines: row ``r`` (0-based) is
reported as line ``r + 2``, as if the file had been written as CSV with a header.

When pyarrow refuses a CSV file (wrong field count, not UTF-8, empty, ...), the file is read again by Python's
``csv`` module, which reports the exact line and the fix: errors cost a second read, a good file never does.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fedchurn.shared.errors import DataError

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)

PARQUET_SUFFIXES = (".parquet", ".pq")
_LINE_SCAN_CHUNK = 64 * 2**20  # bytes per step when counting lines: bounded memory on a 10 GB file


@dataclass(frozen=True, eq=False)
class ColumnTable:
    """Some columns of a table file: Arrow arrays of equal length, with each row's line in the file."""

    path: str
    header: tuple[str, ...]  # every column name of the file (stripped), in file order
    columns: dict[str, pa.Array]  # the columns read (text for CSV; the stored type for Parquet)
    line_numbers: np.ndarray  # int64 (n,), 1-based line of each row

    @property
    def n_rows(self) -> int:
        return len(self.line_numbers)

    def text(self, column: str) -> pa.Array:
        """The column as stripped text (Parquet values are written as text); null stays null."""
        array = self.columns[column]
        if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
            array = pc.cast(array, pa.string())
        return pc.utf8_trim_whitespace(array)

    def take(self, indices: np.ndarray) -> ColumnTable:
        idx = pa.array(np.asarray(indices, dtype=np.int64))
        return ColumnTable(
            self.path,
            self.header,
            {name: array.take(idx) for name, array in self.columns.items()},
            self.line_numbers[np.asarray(indices, dtype=np.int64)],
        )


def is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# Header lookups with errors that say what the header does hold
# --------------------------------------------------------------------------------------------------


def missing_column_error(path: str, header: Sequence[str], column: str, role: str) -> DataError:
    suggestions = [h for h in header if h.lower() == column.lower() and h != column]
    suggestions += [s for s in difflib.get_close_matches(column, header, n=3, cutoff=0.6) if s not in suggestions]
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    shown = ", ".join(repr(h) for h in header[:40])
    if len(header) > 40:
        shown += f", ... ({len(header) - 40} more)"
    return DataError(
        f"the {role} column {column!r} is not in the header{hint} The header has: {shown}",
        path=path,
        line=1,
        column=column,
    )


def check_column(path: str, header: Sequence[str], column: str, role: str) -> None:
    """The column is in the header exactly once."""
    count = sum(1 for h in header if h == column)
    if count == 0:
        raise missing_column_error(path, header, column, role)
    if count > 1:
        raise DataError(
            f"the header names column {column!r} {count} times; it is ambiguous", path=path, line=1, column=column
        )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _check_file(path: str | Path) -> str:
    name = str(path)
    target = Path(path)
    if target.is_dir():
        raise DataError("is a folder, not a CSV file", path=name)
    if not target.exists():
        raise DataError("file not found", path=name, fix="check data.csv_path / data.institution_files")
    try:
        with target.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror or exc}", path=name) from None
    return name


def read_header(path: str | Path) -> tuple[str, ...]:
    """Column names of a CSV or Parquet file, stripped, without reading the rows."""
    name = _check_file(path)
    if is_parquet(path):
        return tuple(n.strip() for n in _parquet_schema(name).names)
    try:
        with open(name, encoding="utf-8-sig", newline="") as handle:
            for record in csv.reader(handle):
                if record:
                    return tuple(cell.strip() for cell in record)
    except (UnicodeDecodeError, csv.Error):
        read_csv_text(name)  # raises the exact error with its line
    raise DataError("is empty: no header row", path=name)


# One remembered table: schema inference reads the file and the data stage reuses the columns (one read per run).
_REMEMBERED: list[tuple[tuple[str, int, int], ColumnTable]] = []


def _file_key(name: str) -> tuple[str, int, int]:
    st = Path(name).stat()
    return (str(Path(name).resolve()), st.st_size, st.st_mtime_ns)


def forget_tables() -> None:
    """Drop the remembered table (its memory)."""
    _REMEMBERED.clear()


def read_columns(
    path: str | Path, columns: Sequence[str], *, roles: Sequence[str] | None = None, remember: bool = False
) -> ColumnTable:
    """The named columns of a CSV or Parquet file, read once, with each row's line.

    ``roles`` (one per column, e.g. "numeric") words the error when a column is missing or named twice. With
    ``remember``, the table is kept for the next read of the same, unchanged file (until ``forget_tables``).
    """
    name = _check_file(path)
    header = read_header(name)
    for i, column in enumerate(columns):
        check_column(name, header, column, roles[i] if roles else "declared")
    wanted = list(dict.fromkeys(columns))
    key = _file_key(name)
    if _REMEMBERED and _REMEMBERED[0][0] == key and set(wanted) <= set(_REMEMBERED[0][1].columns):
        kept = _REMEMBERED[0][1]
        return ColumnTable(name, header, {c: kept.columns[c] for c in wanted}, kept.line_numbers)
    table = _read_parquet(name, header, wanted) if is_parquet(name) else _read_csv(name, header, wanted)
    if remember:
        _REMEMBERED[:] = [(key, table)]
    return table


def _parquet_schema(name: str) -> pa.Schema:
    try:
        return pq.read_schema(name)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"is not a readable Parquet file: {exc}", path=name) from None


def _read_parquet(name: str, header: tuple[str, ...], wanted: list[str]) -> ColumnTable:
    raw_names = {n.strip(): n for n in _parquet_schema(name).names}
    try:
        table = pq.read_table(name, columns=[raw_names[c] for c in wanted])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"is not a readable Parquet file: {exc}", path=name) from None
    if table.num_rows == 0:
        raise DataError("has a header but no data rows", path=name, line=1)
    columns = {c: table.column(raw_names[c]).combine_chunks() for c in wanted}
    return ColumnTable(name, header, columns, np.arange(2, table.num_rows + 2, dtype=np.int64))


def _read_csv(name: str, header: tuple[str, ...], wanted: list[str]) -> ColumnTable:
    raw_header = _raw_header(name)
    by_stripped = {h.strip(): h for h in raw_header}
    include = [by_stripped[c] for c in wanted]
    try:
        table = pa_csv.read_csv(
            name,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={h: pa.string() for h in include},
                include_columns=include,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        logger.debug("%s: pyarrow refused the file (%s); reading it with the csv module for the exact error", name, exc)
        return _from_text(read_csv_text(name), header, wanted)
    if table.num_rows == 0:
        raise DataError("has a header but no data rows", path=name, line=1)
    lines = _data_line_numbers(name, table.num_rows)
    if lines is None:  # a quoted value spans lines: only a full parse knows where each row starts
        return _from_text(read_csv_text(name), header, wanted)
    columns = {c: table.column(by_stripped[c]).combine_chunks() for c in wanted}
    return ColumnTable(name, header, columns, lines)


def _raw_header(name: str) -> list[str]:
    with open(name, encoding="utf-8-sig", newline="") as handle:
        for record in csv.reader(handle):
            if record:
                return record
    raise DataError("is empty: no header row", path=name)


def _data_line_numbers(name: str, n_rows: int) -> np.ndarray | None:
    """1-based line of each data row when every non-blank line after the header is one row; else None."""
    size = Path(name).stat().st_size
    nonblank: list[np.ndarray] = []
    offset = 0
    line_base = 0  # lines completed before this chunk
    previous_newline = -1  # position of the last newline seen, relative to the file
    with open(name, "rb") as handle:
        while offset < size:
            chunk = np.frombuffer(handle.read(_LINE_SCAN_CHUNK), dtype=np.uint8)
            newlines = np.flatnonzero(chunk == 10) + offset
            if len(newlines):
                starts = np.concatenate(([previous_newline + 1], newlines[:-1] + 1))
                lengths = newlines - starts
                # "\r\n" endings: a line holding only "\r" is blank too.
                ends_cr = np.zeros(len(newlines), dtype=bool)
                inside = newlines - 1 - offset
                ok = inside >= 0
                ends_cr[ok] = chunk[inside[ok]] == 13
                if not ok.all() and offset > 0:
                    handle.seek(offset - 1)
                    ends_cr[~ok] = handle.read(1) == b"\r"
                    handle.seek(offset + len(chunk))
                blank = (lengths == 0) | ((lengths == 1) & ends_cr)
                nonblank.append(line_base + 1 + np.flatnonzero(~blank))
                line_base += len(newlines)
                previous_newline = int(newlines[-1])
            offset += len(chunk)
    if previous_newline + 1 < size:  # a last line without a newline
        nonblank.append(np.asarray([line_base + 1]))
    lines = np.concatenate(nonblank).astype(np.int64) if nonblank else np.zeros(0, dtype=np.int64)
    if len(lines) != n_rows + 1:
        return None
    return lines[1:]


def _from_text(text: CsvText, header: tuple[str, ...], wanted: list[str]) -> ColumnTable:
    positions = {h: i for i, h in enumerate(text.header)}
    columns = {c: pa.array([row[positions[c]] for row in text.rows], type=pa.string()) for c in wanted}
    return ColumnTable(text.path, header, columns, np.asarray(text.lines, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# The csv-module reader: exact structural errors (and files pyarrow cannot split into lines)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvText:
    path: str
    header: tuple[str, ...]
    rows: list[list[str]]
    lines: list[int]  # 1-based line where each row starts


def read_csv_text(path: str | Path) -> CsvText:
    """Header and rows of a CSV, with structural checks: readable, UTF-8, a header, rows, equal field counts."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=name, fix="check data.csv_path / data.institution_files") from None
    except IsADirectoryError:
        raise DataError("is a folder, not a CSV file", path=name) from None
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror or exc}", path=name) from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            "is not UTF-8 text", path=name, line=line, fix="save the file as CSV UTF-8 from the spreadsheet"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: tuple[str, ...] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    previous_end = 0
    try:
        for record in reader:
            start = previous_end + 1
            previous_end = reader.line_num
            if not record:  # blank line: csv gives []; trailing blank lines are common
                continue
            if header is None:
                header = tuple(cell.strip() for cell in record)
                if start != 1:
                    logger.info("%s: header found on line %d (blank lines before it)", name, start)
                continue
            if len(record) != len(header):
                raise DataError(
                    f"row has {len(record)} fields but the header has {len(header)}",
                    path=name,
                    line=start,
                    fix="check for unquoted commas or a missing/extra separator on that line",
                )
            rows.append(record)
            lines.append(start)
    except csv.Error as exc:
        raise DataError(f"is not valid CSV: {exc}", path=name, line=previous_end + 1) from None
    if header is None:
        raise DataError("is empty: no header row", path=name)
    if not rows:
        raise DataError("has a header but no data rows", path=name, line=1)
    return CsvText(name, header, rows, lines)
