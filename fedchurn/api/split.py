"""Export the train / validation / test split of each institution, exactly as a run splits its rows.

Each row's part comes from HMAC-SHA256 of the row under the bank's secret key (``clients/splits.split_institution``),
so the export needs that key, and it is read, or created, where the run keeps it:

- a simulation: ``<output_dir>/institutions/<name>/bank_secret.key``, the simulated bank's state folder. A key
  created here is the one the next simulation in that ``output_dir`` uses, so its split is the exported one;
- a bank exporting its own split: ``state_dir``, its SuperNode's state folder, for its one institution;
- ``privacy.reproducible_noise: true`` (research only): the key derived from the seed, as the run derives it.

The files hold customers' rows: they are written readable by their owner only, and nothing here sends anything.
Never export a bank's split on behalf of the consortium: the split is the bank's secret.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedchurn.api.calls import ConfigInput, resolve_config
from fedchurn.api.results import SplitExport
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import ConfigError

logger = logging.getLogger(__name__)

PARTS = ("train", "validation", "test")
FORMATS = ("csv", "parquet")
MANIFEST = "split.json"
SOURCE_LINE = "source_line"  # 1-based line of the row in its CSV (the header is line 1)
_KEY_ATTEMPTS = 8  # as the bank itself: a key this call created may be replaced while it has split nothing used


@dataclass(frozen=True)
class _Key:
    value: bytes
    source: str
    created: bool
    folder: Path | None


def _key(config: FedChurnConfig, name: str, state_dir: Path | None) -> _Key:
    from fedchurn.shared.bank_random import bank_secret_key, reproducible_key

    if config.privacy.reproducible_noise:
        return _Key(
            reproducible_key(config.seed, name), "derived from the seed (reproducible_noise: NOT secret)", False, None
        )
    folder = state_dir if state_dir is not None else Path(config.output_dir).resolve() / "institutions" / name
    value, created = bank_secret_key(folder)
    return _Key(value, f"the bank's secret key in {folder}", created, folder)


def _split(config: FedChurnConfig, table: Any, key: _Key) -> Any:
    from fedchurn.clients.splits import UnbalancedSplitError, split_institution
    from fedchurn.shared.bank_random import renew_bank_secret_key

    value = key.value
    for attempt in range(_KEY_ATTEMPTS):
        try:
            return split_institution(
                table,
                validation_fraction=config.data.validation_fraction,
                test_fraction=config.data.test_fraction,
                key=value,
            )
        except UnbalancedSplitError:
            if not key.created or key.folder is None or attempt == _KEY_ATTEMPTS - 1:
                raise
            value = renew_bank_secret_key(key.folder)  # created by this call: it has split nothing anyone used
    raise AssertionError("unreachable")  # pragma: no cover


def table_frame(table: Any) -> Any:
    """A checked table's rows as a data frame: the source line, the schema's columns, the label as read."""
    import pandas as pd

    schema = table.schema
    frame = pd.DataFrame({SOURCE_LINE: table.line_numbers.astype("int64")})
    for index, column in enumerate(schema.numeric):
        frame[column] = table.numeric[:, index]
    for index, column in enumerate(schema.categorical):
        frame[column] = pd.Series(table.categorical[:, index], dtype="object")
    if table.labels is not None:
        if table.positive_value is not None and table.negative_value is not None:
            frame[schema.label] = [table.positive_value if v == 1 else table.negative_value for v in table.labels]
        else:
            frame[schema.label] = table.labels.astype("int64")
    return frame


def _write(frame: Any, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # customers' rows: owner only
    os.close(descriptor)
    if fmt == "csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def export_split(
    config: ConfigInput = None,
    *,
    out: str | os.PathLike[str],
    institutions: Sequence[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    format: str = "csv",
    overwrite: bool = False,
    **overrides: Any,
) -> SplitExport:
    """Write ``out/<institution>/{train,validation,test}.<format>`` and ``out/split.json``; see the module."""
    import pandas as pd

    from fedchurn.shared.institution_rows import institution_names, read_institution
    from fedchurn.shared.partitions import load_partition, stage_partitions

    if format not in FORMATS:
        raise ConfigError("format", format, f"must be one of {', '.join(FORMATS)}")
    resolved = resolve_config(config, overrides)
    names = list(institutions) if institutions else institution_names(resolved.data, seed=resolved.seed)
    bank_dir = Path(state_dir).expanduser() if state_dir is not None else None
    if bank_dir is not None and len(names) != 1:
        raise ConfigError(
            "state_dir",
            str(bank_dir),
            f"is one bank's state folder, but {len(names)} institutions would be split with its key",
            "name the bank's own institution (--institution NAME)",
        )
    folder = Path(out).expanduser().resolve()
    targets = {(n, p): folder / n / f"{p}.{format}" for n in names for p in PARTS}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise ConfigError("out", str(folder), f"already holds {existing[0]}", "choose another folder or overwrite")
    rows: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fedchurn-split-") as staging:
        if resolved.data.source == "csv":
            stage_partitions(resolved.data, staging)  # one read of the table, as a simulation does
        for name in names:
            staged = load_partition(resolved.data, staging, name) if resolved.data.source == "csv" else None
            table = staged if staged is not None else read_institution(resolved.data, name, seed=resolved.seed)
            key = _key(resolved, name, bank_dir)
            sources[name] = key.source + (" (created now)" if key.created else "")
            split = _split(resolved, table, key)
            for part in PARTS:
                piece = getattr(split, part)
                _write(table_frame(piece), targets[(name, part)], format)
                churned = int(piece.labels.sum()) if piece.labels is not None else None
                rows.append(
                    {
                        "institution": name,
                        "part": part,
                        "rows": piece.n_rows,
                        "churned": churned,
                        "path": str(targets[(name, part)]),
                    }
                )
    files = pd.DataFrame(rows, columns=["institution", "part", "rows", "churned", "path"])
    manifest = {
        "format": format,
        "validation_fraction": resolved.data.validation_fraction,
        "test_fraction": resolved.data.test_fraction,
        "split": "each row's part: HMAC-SHA256(key, row) as a coin in [0, 1): validation, then test, else train",
        "key": sources,
        "files": rows,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("split of %d institutions written to %s", len(names), folder)
    return SplitExport(out_dir=folder, files=files, key_source=sources)
