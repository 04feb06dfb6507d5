"""The declared-bounds preprocessor: clipping, scaling, imputation and one-hot encoding from the schema alone.

It reads no statistic of any rows: one customer's row changes only that customer's features, which is what the
DP-SGD sensitivity assumes for the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedchurn.shared.config import SchemaConfig
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.raw_table import RawTable

# A declared range maps onto [-2, 2]: about the spread standardised features had (±2 sd holds ~95% of a column),
# which the default learning rate and clipping norm were tuned for.
SCALED_HALF_WIDTH = 2.0
_PREPROCESSOR_FORMAT = "fedchurn-preprocessor"
_PREPROCESSOR_VERSION = 2  # 2: declared bounds only (1 fitted means/stds/medians/modes on the rows)


@dataclass(frozen=True)
class Preprocessor:
    """Clipping, scaling, imputation and one-hot encoding from the DECLARED schema only.

    Nothing here is computed from a bank's rows: each numeric column is clipped to its declared public bounds
    ``data.schema.bounds`` and mapped linearly onto [-2, 2]; a blank numeric cell becomes 0 (the midpoint of the
    bounds); categories use the declared vocabulary, and a blank or undeclared value is all-zero. So one customer's
    row changes only that customer's features, never another's, which is what the DP-SGD sensitivity (one
    clipped per-customer gradient, norm <= C) assumes for the whole pipeline.
    """

    schema: SchemaConfig
    lows: tuple[float, ...]  # declared bounds, in schema.numeric order
    highs: tuple[float, ...]

    @classmethod
    def from_schema(cls, schema: SchemaConfig) -> Preprocessor:
        """The preprocessor a schema declares; a numeric column without bounds is a ConfigError naming it."""
        missing = [c for c in schema.numeric if c not in schema.bounds]
        if missing:
            raise ConfigError(
                f"data.schema.bounds.{missing[0]}",
                None,
                f"numeric column(s) {', '.join(missing)} have no declared bounds; scaling from a bank's own rows "
                "would let one customer change every other customer's features, outside the accounted ε",
                f"declare a public value range, e.g. data.schema.bounds: {{{missing[0]}: [low, high]}} (values "
                "outside it are clipped), or infer the schema with 'fedchurn simulate --data'",
            )
        lows = tuple(float(schema.bounds[c][0]) for c in schema.numeric)
        highs = tuple(float(schema.bounds[c][1]) for c in schema.numeric)
        return cls(schema, lows, highs)

    @classmethod
    def fit(cls, train: RawTable) -> Preprocessor:
        """Same as ``from_schema(train.schema)``: the rows are deliberately not read (kept for callers)."""
        return cls.from_schema(train.schema)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.schema.feature_names

    def transform(self, table: RawTable) -> np.ndarray:
        """float32 (n, len(feature_names)): numeric columns clipped and scaled to [-2, 2], then one-hot categories.

        Row-wise: each output row depends on its own input row and the declared schema only.
        """
        if table.schema.numeric != self.schema.numeric or table.schema.categorical != self.schema.categorical:
            raise DataError(
                f"table of institution {table.institution!r} follows a different schema than the preprocessor",
                path=table.source,
            )
        n = table.n_rows
        out = np.zeros((n, len(self.schema.feature_names)), dtype=np.float32)
        k = len(self.schema.numeric)
        if k:
            low, high = np.asarray(self.lows), np.asarray(self.highs)
            clipped = np.clip(table.numeric, low, high)  # NaN stays NaN
            scaled = SCALED_HALF_WIDTH * (2.0 * (clipped - low) / (high - low) - 1.0)
            out[:, :k] = np.where(np.isnan(scaled), 0.0, scaled)  # blank: the midpoint of the declared bounds
        offset = k
        for j, categories in enumerate(self.schema.categorical.values()):
            position = {c: i for i, c in enumerate(categories)}
            for r, value in enumerate(table.categorical[:, j]):
                code = position.get(value) if value is not None else None
                if code is not None:  # blank or undeclared: all-zero (never a learned vocabulary)
                    out[r, offset + code] = 1.0
            offset += len(categories)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for checkpoints); ``Preprocessor.from_dict(p.to_dict()) == p``."""
        return {
            "format": _PREPROCESSOR_FORMAT,
            "version": _PREPROCESSOR_VERSION,
            "schema": {
                "label": self.schema.label,
                "positive": self.schema.positive,
                "numeric": list(self.schema.numeric),
                "categorical": {k: list(v) for k, v in self.schema.categorical.items()},
                "drop": list(self.schema.drop),
                "bounds": {k: list(v) for k, v in self.schema.bounds.items()},
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessor:
        """Inverse of ``to_dict``; a malformed dict is a DataError naming the key."""

        def bad(key: str, rule: str) -> DataError:
            return DataError(f"saved preprocessor: key {key!r} {rule}", fix="the file is damaged or not from fedchurn")

        if not isinstance(d, Mapping):
            raise bad("(top level)", f"must be a mapping, got {type(d).__name__}")
        expected = {"format", "version", "schema"}
        missing = sorted(expected - set(d))
        if missing:
            raise bad(missing[0], "is missing")
        unknown = sorted(str(k) for k in set(d) - expected)
        if unknown:
            raise bad(unknown[0], "is not a preprocessor key")
        if d["format"] != _PREPROCESSOR_FORMAT:
            raise bad("format", f"must be {_PREPROCESSOR_FORMAT!r}, got {d['format']!r}")
        if d["version"] != _PREPROCESSOR_VERSION:
            raise DataError(
                f"saved preprocessor: version {d['version']!r} is not {_PREPROCESSOR_VERSION}",
                fix="version 1 scaled with statistics of the bank's rows; retrain the run with this release",
            )
        schema = _schema_from_dict(d["schema"], bad)
        try:
            return cls.from_schema(schema)
        except ConfigError as exc:
            raise bad("schema.bounds", f"is incomplete: {exc}") from None


def _schema_from_dict(value: Any, bad: Any) -> SchemaConfig:
    if not isinstance(value, Mapping):
        raise bad("schema", "must be a mapping")
    try:
        label, positive = value["label"], value["positive"]
        numeric, categorical, drop = value["numeric"], value["categorical"], value["drop"]
        bounds = value["bounds"]
    except KeyError as exc:
        raise bad(f"schema.{exc.args[0]}", "is missing") from None
    if not isinstance(label, str) or not (positive is None or isinstance(positive, str)):
        raise bad("schema.label", "and schema.positive must be text")
    for key, names in (("numeric", numeric), ("drop", drop)):
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise bad(f"schema.{key}", "must be a list of column names")
    if not isinstance(categorical, Mapping) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in categorical.values()
    ):
        raise bad("schema.categorical", "must map column names to lists of category values")
    if not isinstance(bounds, Mapping) or not all(
        isinstance(v, list) and len(v) == 2 and all(_is_plain_number(x) for x in v) for v in bounds.values()
    ):
        raise bad("schema.bounds", "must map numeric column names to [low, high]")
    try:
        return SchemaConfig(
            label=label,
            positive=positive,
            numeric=tuple(numeric),
            categorical={str(k): tuple(v) for k, v in categorical.items()},
            drop=tuple(drop),
            bounds={str(k): (float(v[0]), float(v[1])) for k, v in bounds.items()},
        )
    except ConfigError as exc:
        raise bad("schema", f"is not a valid schema: {exc}") from None


def _is_plain_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))
