"""Which institutions a consortium has and one institution's checked rows: from its CSV or the synthetic generator.

Everything here works on ONE institution at a time: rows are never pooled across institutions. ``write_csv``
writes a table back as CSV that reads back to the same values.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from fedchurn.shared.config import DataConfig, SchemaConfig
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.institution_file import institution_first_lines, read_csv_table
from fedchurn.shared.partitions import read_manifest
from fedchurn.shared.raw_table import RawTable
from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA, generate_synthetic_institution, synthetic_name


def resolve_schema(data: DataConfig) -> SchemaConfig:
    """The schema the institutions' tables follow: the synthetic one, or the declared one."""
    if data.source == "synthetic":
        return SYNTHETIC_SCHEMA
    if data.schema is None:  # DataConfig already refuses this; kept for callers that build configs by hand
        raise ConfigError("data.schema", None, "is required when data.source is 'csv'")
    return data.schema


# --------------------------------------------------------------------------------------------------
# Institutions
# --------------------------------------------------------------------------------------------------


def institution_names(data: DataConfig, *, seed: int, output_dir: str | None = None) -> list[str]:
    """The institutions of the consortium, in a stable order (``data.institutions`` when given).

    With ``output_dir`` holding this data's staged partitions (shared/partitions.py), the names come from there
    instead of another read of the table.
    """
    del seed  # names do not depend on the seed today; kept so callers need not change if they ever do
    manifest = read_manifest(data, output_dir) if output_dir and data.source == "csv" else None
    if manifest is not None:
        available = sorted(manifest["institutions"])
        where = "the data"
    elif data.source == "synthetic":
        available = [synthetic_name(i) for i in range(data.synthetic.institutions)]
        where = f"the synthetic consortium (data.synthetic.institutions = {data.synthetic.institutions})"
    elif data.institution_files:
        available = list(data.institution_files)
        where = "data.institution_files"
    else:
        path, column = _table_source(data)
        available = sorted(institution_first_lines(path, column))
        where = f"column '{column}' of {path}"
    if not data.institutions:
        return available
    missing = [name for name in data.institutions if name not in available]
    if missing:
        raise DataError(
            f"institution(s) {', '.join(repr(m) for m in missing)} listed in data.institutions not found in {where}",
            fix=f"available: {', '.join(repr(a) for a in available)}",
        )
    return list(data.institutions)


def read_institution(data: DataConfig, institution: str, *, seed: int, require_label: bool = True) -> RawTable:
    """One institution's checked rows, from the synthetic generator or its CSV."""
    schema = resolve_schema(data)
    if data.source == "synthetic":
        names = [synthetic_name(i) for i in range(data.synthetic.institutions)]
        if institution not in names:
            raise DataError(
                f"no synthetic institution named {institution!r}",
                fix=f"the synthetic consortium has {', '.join(names)}",
            )
        return generate_synthetic_institution(data.synthetic, names.index(institution), seed=seed)
    if data.institution_files:
        if institution not in data.institution_files:
            raise DataError(
                f"no institution named {institution!r} in data.institution_files",
                fix=f"known institutions: {', '.join(repr(k) for k in data.institution_files)}",
            )
        return read_csv_table(
            data.institution_files[institution],
            schema,
            institution=institution,
            missing_values=data.missing_values,
            require_label=require_label,
        )
    path, column = _table_source(data)
    return read_csv_table(
        path,
        schema,
        institution=institution,
        missing_values=data.missing_values,
        require_label=require_label,
        institution_column=column,
    )


def _table_source(data: DataConfig) -> tuple[str, str]:
    if data.csv_path is None or not data.institution_column:  # DataConfig refuses this; for hand-built configs
        raise ConfigError(
            "data.csv_path", data.csv_path, "give data.csv_path with data.institution_column, or data.institution_files"
        )
    return data.csv_path, data.institution_column


# --------------------------------------------------------------------------------------------------
# CSV reading
# --------------------------------------------------------------------------------------------------


def write_csv(table: RawTable, path: str | Path, *, institution_column: str | None = None) -> None:
    """Write the table as CSV that ``read_csv_table`` reads back to the same values (blank where missing)."""
    schema = table.schema
    positive = table.positive_value or schema.positive or "1"
    negative = table.negative_value or ("0" if positive != "0" else "1")
    header = [*schema.numeric, *schema.categorical]
    if table.labels is not None:
        header.append(schema.label)
    if institution_column:
        header.insert(0, institution_column)
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for r in range(table.n_rows):
                cells = [_format_number(v) for v in table.numeric[r]]
                cells += ["" if v is None else str(v) for v in table.categorical[r]]
                if table.labels is not None:
                    cells.append(positive if table.labels[r] == 1 else negative)
                if institution_column:
                    cells.insert(0, table.institution)
                writer.writerow(cells)
    except OSError as exc:
        raise DataError(f"cannot be written: {exc.strerror or exc}", path=str(path)) from None


def _format_number(value: float) -> str:
    if math.isnan(value):
        return ""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 45 rather than 45.0: easier to read, same value
    return repr(float(value))  # shortest text that reads back to the same float
