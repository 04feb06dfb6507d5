"""One institution's checked rows from a CSV (or Parquet) file, and the institutions a shared file holds.

Every problem is a ``DataError`` naming the file, the 1-based line (the header is line 1), the column and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedchurn.shared.config import SchemaConfig
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.raw_table import RawTable
from fedchurn.shared.table_checks import MISSING_POLICIES, check_rows, institution_codes
from fedchurn.shared.table_io import read_columns, read_header

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)


def columns_to_read(
    header: tuple[str, ...], schema: SchemaConfig, *, require_label: bool, institution_column: str | None
) -> tuple[list[str], list[str], bool]:
    """(columns, their roles, whether the label is read) for a table following ``schema``."""
    columns = [*schema.numeric, *schema.categorical]
    roles = ["numeric"] * len(schema.numeric) + ["categorical"] * len(schema.categorical)
    has_label = schema.label in header or require_label
    if has_label:
        columns.append(schema.label)
        roles.append("label")
    if institution_column:
        columns.append(institution_column)
        roles.append("institution")
    return columns, roles, has_label


def log_extra_columns(name: str, header: tuple[str, ...], schema: SchemaConfig, institution_column: str | None) -> None:
    used = {schema.label, *schema.numeric, *schema.categorical, *schema.drop}
    if institution_column:
        used.add(institution_column)
    extra = [h for h in header if h not in used]
    if extra:
        logger.info("%s: ignoring columns not in the schema: %s", name, ", ".join(extra))


def read_csv_table(
    path: str | Path,
    schema: SchemaConfig,
    *,
    institution: str,
    missing_values: str,
    require_label: bool = True,
    institution_column: str | None = None,
) -> RawTable:
    """Read and check one institution's rows from a CSV (or Parquet) file.

    With ``institution_column`` only the rows whose value there is ``institution`` are kept. With
    ``require_label=False`` (scoring new customers) the label column may be absent, or present with every cell
    blank; then ``labels`` is None.
    """
    if missing_values not in MISSING_POLICIES:
        raise ConfigError("data.missing_values", missing_values, f"must be one of {', '.join(MISSING_POLICIES)}")
    header = read_header(path)
    columns, roles, has_label = columns_to_read(
        header, schema, require_label=require_label, institution_column=institution_column
    )
    table = read_columns(path, columns, roles=roles)
    log_extra_columns(table.path, header, schema, institution_column)
    if institution_column:
        values, codes = institution_codes(table, institution_column)
        if institution not in values:
            raise DataError(
                f"no rows for institution {institution!r}",
                path=table.path,
                column=institution_column,
                fix=f"institutions in the file: {', '.join(repr(v) for v in sorted(values))}",
            )
        table = table.take(np.flatnonzero(codes == values.index(institution)))
    checked = check_rows(
        table,
        schema,
        institution=institution,
        missing_values=missing_values,
        require_label=require_label,
        has_label=has_label,
    )
    return checked.to_raw_table(schema, institution=institution, source=table.path)


def institution_first_lines(path: str, column: str) -> dict[str, int]:
    """Distinct values of one column -> first line; blank or unusable values are errors."""
    table = read_columns(path, [column], roles=["institution"])
    values, codes = institution_codes(table, column)
    first = np.full(len(values), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes), dtype=np.int64)[::-1]
    return {v: int(table.line_numbers[r]) for v, r in zip(values, first.tolist(), strict=True)}
