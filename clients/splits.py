"""One institution's secret train / validation / test split: each row's part comes from its own keyed coin."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedchurn.clients.row_identity import row_bytes
from fedchurn.shared.bank_random import row_coin
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.raw_table import RawTable

_MIN_PER_CLASS = 3  # one positive and one negative in each of train, validation and test


@dataclass(frozen=True, eq=False)
class Split:
    train: RawTable
    validation: RawTable
    test: RawTable


def _class_counts(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) sizes for one class of n >= 3 rows, each >= 1."""
    n_val = max(1, round(validation_fraction * n))
    n_test = max(1, round(test_fraction * n))
    while n - n_val - n_test < 1:  # rounding up both parts can leave training empty on tiny classes
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


class UnbalancedSplitError(DataError):
    """A part of the secret split lacks a churned or a retained customer."""


def split_institution(table: RawTable, *, validation_fraction: float, test_fraction: float, key: bytes) -> Split:
    """A secret split, stable per row: each row's part comes from its own coin, HMAC-SHA256(key, row).

    The coin is uniform in [0, 1) and independent across distinct rows; below ``validation_fraction`` the row
    validates, below ``validation_fraction + test_fraction`` it tests, otherwise it trains. Adding, removing or
    reordering other rows moves no row, and without the bank's secret ``key`` nobody can tell which rows train.
    Each part must hold at least one churned and one retained customer: when it does not, this is an error
    (:class:`UnbalancedSplitError`) that names the fix, never a silent reshuffle.
    """
    if not (0.0 < validation_fraction < 1.0 and 0.0 < test_fraction < 1.0 and validation_fraction + test_fraction < 1):
        raise ConfigError(
            "data.validation_fraction",
            (validation_fraction, test_fraction),
            "validation and test fractions must be in (0, 1) and sum to less than 1",
        )
    if table.labels is None:
        raise DataError(
            f"institution {table.institution!r} has no label column: it cannot be split for training",
            path=table.source,
            column=table.schema.label,
        )
    positives = int(table.labels.sum())
    negatives = table.n_rows - positives
    if positives < _MIN_PER_CLASS or negatives < _MIN_PER_CLASS:
        raise DataError(
            f"institution {table.institution!r} is too small to split: {table.n_rows} rows, {positives} churned and "
            f"{negatives} retained; train, validation and test each need a churned and a retained customer, so at "
            f"least {_MIN_PER_CLASS} of each are needed",
            path=table.source,
            fix="add rows, merge it with another institution's data at the source, or leave it out via "
            "data.institutions",
        )
    coins = np.array([row_coin(key, row) for row in row_bytes(table)], dtype=np.float64)
    part_of = np.where(coins < validation_fraction, 1, np.where(coins < validation_fraction + test_fraction, 2, 0))
    for part, name in ((0, "training"), (1, "validation"), (2, "test")):
        labels = table.labels[part_of == part]
        churned = int(labels.sum())
        if churned == 0 or churned == len(labels):
            raise UnbalancedSplitError(
                f"institution {table.institution!r}: its {name} part holds "
                f"{'no churned' if churned == 0 else 'no retained'} customer ({positives} churned and {negatives} "
                "retained in all); each row's part is its own secret coin, so a small class can miss a part",
                path=table.source,
                fix="add rows, raise data.validation_fraction / data.test_fraction, or give the bank a new secret "
                "key before it trains (that re-splits every row)",
            )
    # np.flatnonzero keeps the file's row order within each part, which makes errors and inspection easier.
    train, validation, test = (table.take(np.flatnonzero(part_of == part)) for part in (0, 1, 2))
    return Split(train=train, validation=validation, test=test)
