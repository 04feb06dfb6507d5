"""Checks of a table's values against the declared schema, column-wise, with the messages users know.

Every problem is a ``DataError`` naming the file, the 1-based line (the header is line 1), the column and the
fix. When a table has several problems, the one reported is the first in the file (row by row; in a row,
numeric columns before categorical ones), as a reader going row by row would report it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedchurn.shared.config import INSTITUTION_NAME_RULE, SchemaConfig, is_valid_institution_name
from fedchurn.shared.errors import DataError
from fedchurn.shared.raw_table import CheckedRows
from fedchurn.shared.table_io import ColumnTable

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)

LABEL_POSITIVE_DEFAULTS = ("1", "yes", "true", "y", "churn", "churned")  # case-insensitive, when positive is None
MISSING_POLICIES = ("error", "drop", "impute")
# A declared category named so collects every undeclared value of its column (schema inference uses it for
# values seen at one institution only); without it an undeclared value is an error.
OTHER = "(other)"


# --------------------------------------------------------------------------------------------------
# Small column helpers
# --------------------------------------------------------------------------------------------------


def _mask(array: pa.Array) -> np.ndarray:
    """Arrow boolean (nulls false) -> numpy bool."""
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _blank(text: pa.Array) -> np.ndarray:
    return _mask(pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_length(text), 0)))


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _cell(text: pa.Array, row: int) -> str:
    value = text[row].as_py()
    return "" if value is None else str(value)


def _is_positive_default(value: str) -> bool:
    return value.strip().lower() in LABEL_POSITIVE_DEFAULTS


def check_institution_value(value: str, path: str, line: int, column: str) -> None:
    if not is_valid_institution_name(value):
        raise DataError(
            f"institution name {value!r} is not usable: institution names become folder names and must be "
            f"{INSTITUTION_NAME_RULE}",
            path=path,
            line=line,
            column=column,
            fix="rename the value in the file, or give each institution its own file with data.institution_files",
        )


def institution_codes(table: ColumnTable, column: str) -> tuple[list[str], np.ndarray]:
    """Distinct institution values in order of first appearance, and each row's index into them.

    Blank or unusable values are errors at their first line.
    """
    text = table.text(column)
    first_blank = _first(_blank(text))
    encoded = pc.dictionary_encode(text)
    values: list[str] = encoded.dictionary.to_pylist()
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    first_row = np.full(len(values), -1, dtype=np.int64)
    rows = np.arange(len(codes), dtype=np.int64)[::-1]
    first_row[codes[::-1]] = rows  # later writes win: the first occurrence, reading backwards
    for value, row in sorted(zip(values, first_row.tolist(), strict=True), key=lambda vr: vr[1]):
        if first_blank is not None and first_blank <= row:
            break
        check_institution_value(value, table.path, int(table.line_numbers[row]), column)
    if first_blank is not None:
        line = int(table.line_numbers[first_blank])
        raise DataError("blank institution cell", path=table.path, line=line, column=column)
    return values, codes


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def _labels(
    text: pa.Array, lines: np.ndarray, *, positive: str | None, path: str, column: str
) -> tuple[np.ndarray, str | None, str | None]:
    """0/1 labels, the positive text and the negative text (None where not seen)."""
    blank = _first(_blank(text))
    if blank is not None:
        raise DataError(
            "blank label: every row needs its churn label",
            path=path,
            line=int(lines[blank]),
            column=column,
            fix="fill the label, or remove the row",
        )
    distinct: list[str] = pc.unique(text).to_pylist()  # in order of first appearance

    def first_line(value: str) -> int:
        return int(lines[int(pc.index(text, value).as_py())])

    if positive is not None:
        others = [v for v in distinct if v != positive]
        if len(others) > 1:
            near = [v for v in distinct if v.lower() == positive.lower() and v != positive]
            hint = f" (labels are matched exactly: did you mean {near[0]!r}?)" if near else ""
            raise DataError(
                f"label value {others[1]!r} is neither the positive value {positive!r} nor the other value "
                f"{others[0]!r}: a churn label has exactly two values{hint}",
                path=path,
                line=first_line(others[1]),
                column=column,
                fix="set data.schema.positive to the value that means churn, and use one other value",
            )
        negative = others[0] if others else None
    else:
        if len(distinct) > 2:
            raise DataError(
                f"label is not binary: more than 2 distinct values ({', '.join(repr(v) for v in distinct[:10])})",
                path=path,
                line=first_line(distinct[2]),
                column=column,
                fix="a churn label has exactly two values",
            )
        recognised = [v for v in distinct if _is_positive_default(v)]
        if len(recognised) > 1 or (len(distinct) == 2 and not recognised):
            raise DataError(
                f"cannot tell which label value means churn: the values are {', '.join(repr(v) for v in distinct)}",
                path=path,
                column=column,
                fix="set data.schema.positive to the value that means churn",
            )
        positive = recognised[0] if recognised else None
        others = [v for v in distinct if v != positive]
        negative = others[0] if others else None
    labels = _mask(pc.equal(text, positive)).astype(np.int64) if positive is not None else np.zeros(len(text), np.int64)
    return labels, positive, negative


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def _is_finite_text(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _is_number_text(value: str) -> bool:
    """Python's float reads it (finite or not: 'NaN', 'inf', '-Infinity' and '1e999' are numbers here)."""
    try:
        float(value)
    except ValueError:
        return False
    return True


def parse_numeric(table: ColumnTable, column: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(float64 values with NaN where missing, missing mask, first row holding a non-number or None).

    A cell is missing when it is blank or holds a number that is not finite: 'NaN', 'nan', 'inf', '-inf',
    'Infinity', '1e999' in a CSV; NaN or +-inf in a Parquet float column. Missing cells then follow
    data.missing_values, as blank ones always did. A cell that is no number at all ('abc', '1.000.000') is an error.
    """
    array = table.columns[column]
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_decimal(array.type):
        values = np.asarray(pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        missing = _mask(pc.is_null(array)) | ~np.isfinite(values)
        return np.where(missing, np.nan, values), missing, None
    text = table.text(column)
    blank = _blank(text)
    not_number = np.zeros(len(text), dtype=bool)
    try:
        parsed = pc.cast(pc.if_else(pa.array(blank), pa.scalar(None, pa.string()), text), pa.float64())
        values = np.asarray(parsed.to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Some cell is not a number: find which, by the rule users are told (Python's float of the text).
        distinct = pc.unique(pc.filter(text, pa.array(~blank))).to_pylist()
        bad = [v for v in distinct if not _is_number_text(v)]
        not_number = _mask(pc.is_in(text, value_set=pa.array(bad, pa.string())))
        good = ~blank & ~not_number
        values = np.full(len(text), np.nan)
        values[good] = np.asarray([float(v) for v in pc.filter(text, pa.array(good)).to_pylist()], dtype=np.float64)
    missing = ~not_number & (blank | ~np.isfinite(values))
    return np.where(missing, np.nan, values), missing, _first(not_number)


def check_rows(
    table: ColumnTable,
    schema: SchemaConfig,
    *,
    institution: str,
    missing_values: str,
    require_label: bool,
    has_label: bool,
) -> CheckedRows:
    """Check one institution's rows (``table`` holds only them) and return the values in compact form."""
    name = table.path
    lines = table.line_numbers
    n = table.n_rows

    labels: np.ndarray | None = None
    positive_value: str | None = schema.positive
    negative_value: str | None = None
    if has_label:
        label_text = table.text(schema.label)
        if not require_label and bool(_blank(label_text).all()):
            logger.info("%s: label column %r is blank in every row; reading without labels", name, schema.label)
        else:
            labels, positive_value, negative_value = _labels(
                label_text, lines, positive=schema.positive, path=name, column=schema.label
            )

    # Features: every column's first bad row; the earliest (numeric columns first in a row) is reported.
    problems: list[tuple[int, int, Callable[[], DataError]]] = []
    numeric = np.empty((n, len(schema.numeric)), dtype=np.float64)
    blanks: list[np.ndarray] = []
    non_finite = 0  # missing cells that hold NaN or inf rather than nothing
    for j, column in enumerate(schema.numeric):
        values, blank, bad = parse_numeric(table, column)
        numeric[:, j] = values
        blanks.append(blank)
        if blank.any():
            non_finite += int((blank & ~_blank(table.text(column))).sum())
        if bad is not None:
            cell = _cell(table.text(column), bad)

            def numeric_error(cell: str = cell, row: int = bad, column: str = column) -> DataError:
                return DataError(
                    f"{cell!r} is not a number",
                    path=name,
                    line=int(lines[row]),
                    column=column,
                    fix="numeric columns take plain numbers such as 42 or 3.5; leave a missing value blank, "
                    "or declare the column under data.schema.categorical",
                )

            problems.append((bad, j, numeric_error))
    codes = np.empty((n, len(schema.categorical)), dtype=np.int16)
    for j, (column, allowed) in enumerate(schema.categorical.items()):
        text = table.text(column)
        blank = _blank(text)
        index = pc.index_in(text, value_set=pa.array(list(allowed), pa.string()))
        found = np.asarray(pc.fill_null(index, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
        if OTHER in allowed:
            found = np.where(found < 0, list(allowed).index(OTHER), found)
        codes[:, j] = np.where(blank, -1, found)
        blanks.append(blank)
        bad = _first(~blank & (found < 0))
        if bad is not None:
            cell = _cell(text, bad)

            def category_error(cell: str = cell, row: int = bad, column: str = column) -> DataError:
                declared = ", ".join(repr(v) for v in schema.categorical[column])
                return DataError(
                    f"{cell!r} is not a declared category; allowed: {declared}",
                    path=name,
                    line=int(lines[row]),
                    column=column,
                    fix=f"add it to data.schema.categorical.{column}, or correct the value",
                )

            problems.append((bad, len(schema.numeric) + j, category_error))
    if problems:
        raise min(problems, key=lambda p: (p[0], p[1]))[2]()

    # Blank cells, by the declared policy.
    columns = [*schema.numeric, *schema.categorical]
    blank_matrix = np.column_stack(blanks) if blanks else np.zeros((n, 0), dtype=bool)
    blank_rows = blank_matrix.any(axis=1) if blanks else np.zeros(n, dtype=bool)
    line_numbers = np.asarray(lines, dtype=np.int64)
    rows_dropped = 0
    kept: np.ndarray | None = None
    first_blank_row = _first(np.asarray(blank_rows, dtype=bool))
    if first_blank_row is not None:
        blank_cells = int(blank_matrix.sum())
        if missing_values == "error":
            column = columns[int(np.argmax(blank_matrix[first_blank_row]))]
            cell = _cell(table.text(column), first_blank_row)
            what = "blank cell" if not cell else f"{cell!r} is not a finite number, so the cell counts as missing"
            counts = f"{blank_cells} blank cell(s)"
            if non_finite:
                counts = f"{blank_cells - non_finite} blank and {non_finite} non-finite (NaN, inf) cell(s)"
            raise DataError(
                f"{what} ({counts} in {int(blank_rows.sum())} row(s) in all)",
                path=name,
                line=int(lines[first_blank_row]),
                column=column,
                fix="fill the cells with finite numbers, or set data.missing_values to 'drop' or 'impute'",
            )
        if missing_values == "drop":
            keep = ~blank_rows
            rows_dropped = int(blank_rows.sum())
            if not keep.any():
                raise DataError(
                    f"every row of institution {institution!r} has a blank cell; none left after dropping them",
                    path=name,
                    fix="set data.missing_values to 'impute', or fill the cells",
                )
            kept = np.flatnonzero(keep)
            numeric, codes, line_numbers = numeric[keep], codes[keep], line_numbers[keep]
            labels = None if labels is None else labels[keep]
            logger.info("%s (%s): dropped %d row(s) with blank or non-finite cells", name, institution, rows_dropped)
        else:
            logger.info(
                "%s (%s): %d blank or non-finite cell(s) will be imputed with declared values (bounds midpoint, "
                "no category)",
                name,
                institution,
                blank_cells,
            )

    if require_label and labels is not None and len(np.unique(labels)) < 2:
        only = positive_value if labels[0] == 1 else negative_value
        raise DataError(
            f"label has only one value ({only!r}) at institution {institution!r}: churn prediction needs both "
            "churned and retained customers",
            path=name,
            column=schema.label,
            fix="check data.schema.positive and the institution's rows",
        )
    return CheckedRows(numeric, codes, labels, line_numbers, rows_dropped, positive_value, negative_value, kept)
