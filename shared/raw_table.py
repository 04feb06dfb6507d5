"""An institution's rows once checked against the declared schema: the table every later step works on.

:class:`RawTable` holds the values as read (no scaling, no imputation yet); :class:`CheckedRows` is the compact
form (category codes) the partition cache stores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedchurn.shared.config import SchemaConfig


@dataclass(frozen=True, eq=False)
class RawTable:
    """One institution's rows, already checked against the schema (no scaling, no imputation yet)."""

    institution: str
    source: str  # file path, or "synthetic"
    numeric: np.ndarray  # float64 (n, len(schema.numeric)); NaN where a cell was blank, NaN or inf
    categorical: np.ndarray  # object (n, len(schema.categorical)) of str; None where a cell was blank
    labels: np.ndarray | None  # int64 0/1 (n,); None when the label column is absent
    line_numbers: np.ndarray  # int64 (n,): 1-based CSV line of each row (the header is line 1)
    schema: SchemaConfig
    rows_dropped: int = 0  # rows removed by missing_values="drop" when this table was read
    positive_value: str | None = None  # the label text that meant churn / did not, as read (write_csv uses them)
    negative_value: str | None = None

    def __post_init__(self) -> None:
        n = len(self.line_numbers)
        # Shapes are a programming contract, not user input: a mismatch is a bug.
        if self.numeric.shape != (n, len(self.schema.numeric)):
            raise ValueError(f"numeric has shape {self.numeric.shape}, expected {(n, len(self.schema.numeric))}")
        if self.categorical.shape != (n, len(self.schema.categorical)):
            raise ValueError(
                f"categorical has shape {self.categorical.shape}, expected {(n, len(self.schema.categorical))}"
            )
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels has shape {self.labels.shape}, expected {(n,)}")

    @property
    def n_rows(self) -> int:
        return len(self.line_numbers)

    @property
    def n_positive(self) -> int:
        return 0 if self.labels is None else int(self.labels.sum())

    @property
    def n_blank(self) -> int:
        """Missing cells kept for imputation (blank, NaN or inf numeric -> NaN; blank categorical -> None)."""
        return int(np.isnan(self.numeric).sum()) + int(np.sum(self.categorical == None))  # noqa: E711

    def take(self, indices: np.ndarray) -> RawTable:
        """The rows at ``indices``, in that order, with the same metadata."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            numeric=self.numeric[idx],
            categorical=self.categorical[idx],
            labels=None if self.labels is None else self.labels[idx],
            line_numbers=self.line_numbers[idx],
        )


@dataclass(frozen=True, eq=False)
class CheckedRows:
    """Checked values in compact form: category codes instead of text (what the partition cache stores)."""

    numeric: np.ndarray  # float64 (n, k), NaN where blank
    codes: np.ndarray  # int16 (n, m): index into the declared categories, -1 where blank
    labels: np.ndarray | None  # int64 0/1 (n,)
    line_numbers: np.ndarray  # int64 (n,)
    rows_dropped: int
    positive_value: str | None
    negative_value: str | None
    kept: np.ndarray | None = None  # int64 indices of the rows kept (missing_values="drop"); None: all

    def to_raw_table(self, schema: SchemaConfig, *, institution: str, source: str) -> RawTable:
        n = len(self.line_numbers)
        categorical = np.empty((n, len(schema.categorical)), dtype=object)
        for j, values in enumerate(schema.categorical.values()):
            lookup = np.array([*values, None], dtype=object)  # code -1 -> None
            categorical[:, j] = lookup[self.codes[:, j]]
        return RawTable(
            institution=institution,
            source=source,
            numeric=np.asarray(self.numeric, dtype=np.float64),
            categorical=categorical,
            labels=None if self.labels is None else np.asarray(self.labels, dtype=np.int64),
            line_numbers=np.asarray(self.line_numbers, dtype=np.int64),
            schema=schema,
            rows_dropped=self.rows_dropped,
            positive_value=self.positive_value,
            negative_value=self.negative_value,
        )
