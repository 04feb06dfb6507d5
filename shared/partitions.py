"""The per-run cache of checked partitions: a table is read and checked once, each institution's rows are
written to their own folder, and the worker that trains an institution memory-maps them.

Layout under the run's output folder (removed when the run ends; it holds customers' rows)::

    data-partitions/manifest.json            which data, which institutions, what each file holds
    data-partitions/<institution>/numeric.npy, codes.npy, labels.npy, lines.npy

One institution's folder holds only that institution's rows. The manifest carries a fingerprint of the data
config and of the files (size, modification time); a worker whose config or files differ ignores the cache and
reads the file itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedchurn.shared.config import DataConfig, FedChurnConfig, SchemaConfig, config_to_dict
from fedchurn.shared.errors import DataError
from fedchurn.shared.institution_file import columns_to_read, log_extra_columns, read_csv_table
from fedchurn.shared.raw_table import CheckedRows, RawTable
from fedchurn.shared.table_checks import check_rows, institution_codes
from fedchurn.shared.table_io import forget_tables, read_columns, read_header

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)

CACHE_DIR = "data-partitions"
MANIFEST = "manifest.json"
_FORMAT = "fedchurn-partitions-1"
_ARRAYS = ("numeric", "codes", "labels", "lines")


@dataclass(frozen=True)
class StagedData:
    folder: Path
    institutions: tuple[str, ...]  # every institution in the data, sorted
    seconds: float
    rows: int


def cache_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / CACHE_DIR


def fingerprint(data: DataConfig) -> str:
    """Identity of the data a run reads: the data config and each file's size and modification time."""
    paths = [data.csv_path] if data.csv_path else list(data.institution_files.values())
    stats = []
    for path in paths:
        try:
            st = os.stat(str(path))
            stats.append([str(path), st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([str(path), None, None])
    data_dict = config_to_dict(FedChurnConfig(data=data))["data"]
    text = json.dumps([_FORMAT, data_dict, stats], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _schema(data: DataConfig) -> SchemaConfig:
    if data.schema is None:  # DataConfig refuses csv without a schema
        raise DataError("data.schema is required to stage a table")
    return data.schema


def stage_partitions(data: DataConfig, output_dir: str | Path) -> StagedData:
    """Read every institution's table once, check it, and write each institution's checked rows.

    Raises the same DataError, for the same first problem, as reading the institutions one by one.
    """
    try:
        return _stage(data, output_dir)
    finally:
        forget_tables()  # the pooled table is in the partitions now (or the run stops)


def _stage(data: DataConfig, output_dir: str | Path) -> StagedData:
    started = time.perf_counter()
    folder = cache_folder(output_dir)
    remove_partitions(output_dir)
    if data.institution_files:
        parts = {
            name: _from_raw(read_csv_table(path, _schema(data), institution=name, missing_values=data.missing_values))
            for name, path in data.institution_files.items()
        }
        sources = {name: str(path) for name, path in data.institution_files.items()}
    else:
        parts, source = _partition_table(data)
        sources = dict.fromkeys(parts, source)
    names = sorted(parts)
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for name in names:
        part = parts[name]
        target = folder / name
        target.mkdir(exist_ok=True)
        arrays = {"numeric": part.numeric, "codes": part.codes, "labels": part.labels, "lines": part.line_numbers}
        for key, array in arrays.items():
            np.save(target / f"{key}.npy", np.ascontiguousarray(array), allow_pickle=False)
        entries[name] = {
            "source": sources[name],
            "rows": len(part.line_numbers),
            "rows_dropped": part.rows_dropped,
            "positive_value": part.positive_value,
            "negative_value": part.negative_value,
        }
    manifest = {"format": _FORMAT, "fingerprint": fingerprint(data), "institutions": entries}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    tmp.replace(folder / MANIFEST)  # written last: a half-written cache is never used
    rows = sum(e["rows"] for e in entries.values())
    seconds = time.perf_counter() - started
    logger.info("staged %d institutions, %d rows in %.2f s under %s", len(names), rows, seconds, folder)
    return StagedData(folder, tuple(names), seconds, rows)


def _from_raw(table: RawTable) -> CheckedRows:
    codes = np.full(table.categorical.shape, -1, dtype=np.int16)
    for j, values in enumerate(table.schema.categorical.values()):
        position = {v: i for i, v in enumerate(values)}
        codes[:, j] = [-1 if v is None else position[v] for v in table.categorical[:, j]]
    return CheckedRows(
        table.numeric,
        codes,
        table.labels,
        table.line_numbers,
        table.rows_dropped,
        table.positive_value,
        table.negative_value,
    )


def _partition_table(data: DataConfig) -> tuple[dict[str, CheckedRows], str]:
    """One read of the pooled table; checks on whole columns; a split by institution."""
    schema = _schema(data)
    path, column = str(data.csv_path), str(data.institution_column)
    header = read_header(path)
    columns, roles, _ = columns_to_read(header, schema, require_label=True, institution_column=column)
    table = read_columns(path, columns, roles=roles)
    log_extra_columns(table.path, header, schema, column)
    values, codes = institution_codes(table, column)

    def one_by_one() -> dict[str, CheckedRows]:
        # The exact first error, as reading the institutions one by one (in name order) reports it.
        out: dict[str, CheckedRows] = {}
        for name in sorted(values):
            rows = table.take(np.flatnonzero(codes == values.index(name)))
            out[name] = check_rows(
                rows, schema, institution=name, missing_values=data.missing_values, require_label=True, has_label=True
            )
        return out

    try:
        whole = check_rows(
            table, schema, institution="(all)", missing_values=data.missing_values, require_label=True, has_label=True
        )
    except DataError:
        return one_by_one(), table.path
    kept_codes = codes if whole.kept is None else codes[whole.kept]
    labels = whole.labels if whole.labels is not None else np.zeros(len(kept_codes), dtype=np.int64)
    k = len(values)
    totals = np.bincount(kept_codes, minlength=k)
    positives = np.bincount(kept_codes, weights=labels, minlength=k)
    if (totals == 0).any() or (positives == 0).any() or (positives == totals).any():
        return one_by_one(), table.path  # an institution with no rows or one class: its own exact error
    dropped = np.bincount(codes, minlength=k) - totals
    order = np.argsort(kept_codes, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(totals)))
    parts: dict[str, CheckedRows] = {}
    for g, name in enumerate(values):
        idx = order[bounds[g] : bounds[g + 1]]
        parts[name] = CheckedRows(
            whole.numeric[idx],
            whole.codes[idx],
            labels[idx],
            whole.line_numbers[idx],
            int(dropped[g]),
            whole.positive_value,
            whole.negative_value if int(positives[g]) < int(totals[g]) else None,
        )
    return parts, table.path


def read_manifest(data: DataConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """The cache's manifest when it was staged from this very data; else None."""
    path = cache_folder(output_dir) / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != _FORMAT or manifest.get("fingerprint") != fingerprint(data):
        return None
    return manifest


def load_partition(data: DataConfig, output_dir: str | Path, institution: str) -> RawTable | None:
    """The institution's checked rows from the cache (memory-mapped), or None when there is no valid cache."""
    manifest = read_manifest(data, output_dir)
    if manifest is None or institution not in manifest["institutions"]:
        return None
    entry = manifest["institutions"][institution]
    folder = cache_folder(output_dir) / institution
    try:
        arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r", allow_pickle=False) for key in _ARRAYS}
    except (OSError, ValueError):
        return None
    rows = CheckedRows(
        arrays["numeric"],
        np.asarray(arrays["codes"]),
        np.asarray(arrays["labels"], dtype=np.int64),
        np.asarray(arrays["lines"], dtype=np.int64),
        int(entry["rows_dropped"]),
        entry["positive_value"],
        entry["negative_value"],
    )
    return rows.to_raw_table(_schema(data), institution=institution, source=str(entry["source"]))


def remove_partitions(output_dir: str | Path) -> None:
    shutil.rmtree(cache_folder(output_dir), ignore_errors=True)
