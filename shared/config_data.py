"""The ``data`` section of the config: where each institution's rows come from, their declared schema, the
synthetic consortium, and the rules names and values must follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fedchurn.shared.errors import ConfigError


@dataclass(frozen=True)
class SchemaConfig:
    """Which columns of a customer table mean what."""

    label: str  # the churn column
    positive: str | None = None  # the label value that means "churned"; None: 1 / yes / true
    numeric: tuple[str, ...] = ()
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> allowed values
    drop: tuple[str, ...] = ()  # identifiers, leaky columns: ignored if present
    bounds: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # numeric column -> declared [low, high]; values are clipped to it

    def __post_init__(self) -> None:
        require(bool(self.label), "data.schema.label", self.label, "must name the churn column")
        if not self.numeric and not self.categorical:
            raise ConfigError(
                "data.schema",
                "no features",
                "declare at least one numeric or categorical column",
                "list columns under data.schema.numeric / data.schema.categorical",
            )
        seen: dict[str, str] = {}
        for kind, names in (("numeric", self.numeric), ("categorical", tuple(self.categorical))):
            for name in names:
                if name == self.label:
                    raise ConfigError(f"data.schema.{kind}", name, "the label column cannot be a feature")
                if name in seen:
                    raise ConfigError(f"data.schema.{kind}", name, f"column is already declared as {seen[name]}")
                seen[name] = kind
        for name, values in self.categorical.items():
            if len(values) == 0:
                raise ConfigError(f"data.schema.categorical.{name}", list(values), "list at least one category value")
            if len(set(values)) != len(values):
                raise ConfigError(f"data.schema.categorical.{name}", list(values), "values must be unique")
        for name in self.drop:
            if name in seen or name == self.label:
                raise ConfigError("data.schema.drop", name, "a dropped column cannot also be label or feature")
        for name, bound in self.bounds.items():  # declared, public ranges: preprocessing never reads them from rows
            key = f"data.schema.bounds.{name}"
            if name not in self.numeric:
                raise ConfigError(key, list(bound), "bounds are for numeric columns only", "list it under numeric")
            if len(bound) != 2 or not all(math.isfinite(v) for v in bound) or not bound[0] < bound[1]:
                raise ConfigError(key, list(bound), "must be [low, high] with finite low < high")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Model input order: numeric columns, then one entry per category of each categorical column."""
        names = list(self.numeric)
        for column, values in self.categorical.items():
            names.extend(f"{column}={value}" for value in values)
        return tuple(names)


@dataclass(frozen=True)
class SyntheticConfig:
    """The seeded synthetic consortium: a realistic bank-customer table per institution."""

    institutions: int = 6
    min_rows: int = 400  # institution sizes are spread log-uniformly between these
    max_rows: int = 3000
    churn_rate_min: float = 0.12
    churn_rate_max: float = 0.30
    feature_shift: float = 0.5  # spread of per-institution feature means, in feature standard deviations

    def __post_init__(self) -> None:
        require(self.institutions >= 1, "data.synthetic.institutions", self.institutions, "must be >= 1")
        require(self.min_rows >= 30, "data.synthetic.min_rows", self.min_rows, "must be >= 30")
        require(
            self.max_rows >= self.min_rows,
            "data.synthetic.max_rows",
            self.max_rows,
            f"must be >= data.synthetic.min_rows ({self.min_rows})",
        )
        for key in ("churn_rate_min", "churn_rate_max"):
            value = getattr(self, key)
            require(0.01 <= value <= 0.99, f"data.synthetic.{key}", value, "must be between 0.01 and 0.99")
        require(
            self.churn_rate_max >= self.churn_rate_min,
            "data.synthetic.churn_rate_max",
            self.churn_rate_max,
            "must be >= data.synthetic.churn_rate_min",
        )
        require(
            0.0 <= self.feature_shift <= 5.0, "data.synthetic.feature_shift", self.feature_shift, "must be in [0, 5]"
        )


@dataclass(frozen=True)
class DataConfig:
    """Where each institution's customers come from, and how they are checked and split."""

    source: Literal["synthetic", "csv"] = "synthetic"
    csv_path: str | None = None  # one table holding every institution ...
    institution_column: str | None = None  # ... split by this column
    institution_files: dict[str, str] = field(default_factory=dict)  # or: institution name -> its own CSV
    institutions: tuple[str, ...] = ()  # optional: only these institutions, in this order
    schema: SchemaConfig | None = None  # required for csv; synthetic data brings its own
    missing_values: Literal["error", "drop", "impute"] = "impute"  # blank, NaN or inf cells: fail, drop row, or fill
    validation_fraction: float = 0.15
    test_fraction: float = 0.2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        require(
            0.0 < self.validation_fraction < 0.5,
            "data.validation_fraction",
            self.validation_fraction,
            "must be > 0 and < 0.5",
        )
        require(0.0 < self.test_fraction < 0.5, "data.test_fraction", self.test_fraction, "must be > 0 and < 0.5")
        require(
            self.validation_fraction + self.test_fraction < 0.8,
            "data.test_fraction",
            self.test_fraction,
            "validation + test fractions must leave at least 20% for training",
        )
        if len(set(self.institutions)) != len(self.institutions):
            raise ConfigError("data.institutions", list(self.institutions), "names must be unique")
        if self.source == "csv":
            if self.schema is None:
                raise ConfigError(
                    "data.schema",
                    None,
                    "is required when data.source is 'csv'",
                    "declare label, numeric and categorical columns, or use 'fedchurn simulate --data'",
                )
            has_table = self.csv_path is not None
            has_files = bool(self.institution_files)
            if has_table == has_files:
                raise ConfigError(
                    "data.csv_path",
                    self.csv_path,
                    "give either data.csv_path with data.institution_column, or data.institution_files, not both"
                    if has_table
                    else "give data.csv_path with data.institution_column, or data.institution_files",
                )
            if has_table and not self.institution_column:
                raise ConfigError(
                    "data.institution_column",
                    self.institution_column,
                    "is required with data.csv_path: it names the column that says which institution a row is from",
                )
        for name in list(self.institution_files) + list(self.institutions):
            _check_institution_name(name)


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(key, value, rule)


INSTITUTION_NAME_RULE = "1-100 characters of letters, digits, space and - _ . $ +"
_INSTITUTION_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_. $+")


def is_valid_institution_name(name: str) -> bool:
    """Names become folder names at each institution; keep them safe for any file system."""
    return bool(name) and name not in (".", "..") and set(name) <= _INSTITUTION_NAME_CHARS and len(name) <= 100


def _check_institution_name(name: str) -> None:
    if not is_valid_institution_name(name):
        raise ConfigError(
            "data.institutions",
            name,
            f"institution names must be {INSTITUTION_NAME_RULE}",
        )
