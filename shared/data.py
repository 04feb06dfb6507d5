"""Customer tables per institution: checked CSV reading, the synthetic consortium, splits and preprocessing.

Everything here works on ONE institution at a time: rows are never pooled across institutions. A table is
checked strictly against the declared schema when it is read; every problem is a ``DataError`` that names the
file, the 1-based line (the header is line 1) and the column. The preprocessor reads no statistic of any rows: it
clips, scales and imputes from the schema's declared bounds and category lists only.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fedchurn.shared.config import (
    DataConfig,
    FedChurnConfig,
    SchemaConfig,
    SyntheticConfig,
)
from fedchurn.shared.errors import ConfigError, DataError
from fedchurn.shared.partitions import load_partition, read_manifest
from fedchurn.shared.schema_inference import InferredSchema as InferredSchema  # re-exported: callers import them here
from fedchurn.shared.schema_inference import infer_schema as infer_schema
from fedchurn.shared.table_checks import LABEL_POSITIVE_DEFAULTS as LABEL_POSITIVE_DEFAULTS
from fedchurn.shared.table_checks import MISSING_POLICIES as MISSING_POLICIES
from fedchurn.shared.table_checks import RawTable, institution_first_lines
from fedchurn.shared.table_checks import read_csv_table as read_csv_table
from fedchurn.shared.table_io import read_csv_text as _read_csv_text  # noqa: F401 (fedchurn/scoring.py reads it here)

logger = logging.getLogger(__name__)

_REGIONS = ("north", "south", "east", "west", "central")
_CARD_TIERS = ("blue", "silver", "gold", "platinum")

SYNTHETIC_SCHEMA = SchemaConfig(
    label="churned",
    positive="yes",
    numeric=(
        "age",
        "tenure_months",
        "balance",
        "credit_score",
        "estimated_salary",
        "num_products",
        "transactions_last_quarter",
        "complaints_last_year",
        "days_since_last_login",
        "credit_limit_utilisation",
    ),
    categorical={
        "gender": ("F", "M"),
        "region": _REGIONS,
        "card_tier": _CARD_TIERS,
        "is_active_member": ("yes", "no"),
        "has_mortgage": ("yes", "no"),
    },
    bounds={  # public, declared ranges (what a bank's data dictionary would state), not the rows' min/max: about
        # the 1st-99th percentiles of the (public) generator, so that clipping touches few customers
        "age": (18.0, 75.0),
        "tenure_months": (0.0, 360.0),
        "balance": (0.0, 100_000.0),
        "credit_score": (400.0, 850.0),
        "estimated_salary": (10_000.0, 110_000.0),
        "num_products": (1.0, 4.0),
        "transactions_last_quarter": (0.0, 90.0),
        "complaints_last_year": (0.0, 3.0),
        "days_since_last_login": (0.0, 60.0),
        "credit_limit_utilisation": (0.0, 1.0),
    },
)

# A declared range maps onto [-2, 2]: about the spread standardised features had (±2 sd holds ~95% of a column),
# which the default learning rate and clipping norm were tuned for.
SCALED_HALF_WIDTH = 2.0
_PREPROCESSOR_FORMAT = "fedchurn-preprocessor"
_PREPROCESSOR_VERSION = 2  # 2: declared bounds only (1 fitted means/stds/medians/modes on the rows)
_MIN_PER_CLASS = 3  # one positive and one negative in each of train, validation and test


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def resolve_schema(data: DataConfig) -> SchemaConfig:
    """The schema the institutions' tables follow: the synthetic one, or the declared one."""
    if data.source == "synthetic":
        return SYNTHETIC_SCHEMA
    if data.schema is None:  # DataConfig already refuses this; kept for callers that build configs by hand
        raise ConfigError("data.schema", None, "is required when data.source is 'csv'")
    return data.schema


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from ints and strings (sha256: the same on every machine and Python run)."""
    from fedchurn.shared.bank_random import seed_digest

    return int.from_bytes(seed_digest(*parts)[:4], "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# Institutions
# --------------------------------------------------------------------------------------------------


def _synthetic_name(index: int) -> str:
    return f"bank-{index + 1:02d}"


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
        available = [_synthetic_name(i) for i in range(data.synthetic.institutions)]
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
        names = [_synthetic_name(i) for i in range(data.synthetic.institutions)]
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


# --------------------------------------------------------------------------------------------------
# The synthetic consortium
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticProfile:
    """How one synthetic institution differs from the others."""

    name: str
    rows: int
    churn_rate: float  # the target; the drawn labels hit it up to sampling noise
    shifts: tuple[float, ...]  # latent feature mean shifts, in standard deviations


_N_LATENT = 12  # age, tenure, salary, balance, credit score, products, activity, transactions,
# complaints, login recency, utilisation, mortgage


def synthetic_profile(synthetic: SyntheticConfig, index: int, *, seed: int) -> SyntheticProfile:
    """Size, churn rate and feature shifts of institution ``index`` (0-based)."""
    if not 0 <= index < synthetic.institutions:
        raise ValueError(f"index {index} outside 0..{synthetic.institutions - 1}")
    # Geometric spread: bank-01 is the largest, the last the smallest, so small banks always exist.
    fraction = index / (synthetic.institutions - 1) if synthetic.institutions > 1 else 0.0
    rows = round(math.exp(math.log(synthetic.max_rows) + fraction * math.log(synthetic.min_rows / synthetic.max_rows)))
    rng = np.random.default_rng(derive_seed("synthetic-institution", seed, index))
    churn_rate = float(rng.uniform(synthetic.churn_rate_min, synthetic.churn_rate_max))
    shifts = rng.normal(0.0, synthetic.feature_shift, size=_N_LATENT + 2 + len(_REGIONS))
    return SyntheticProfile(_synthetic_name(index), rows, churn_rate, tuple(float(s) for s in shifts))


@dataclass(frozen=True)
class _ChurnModel:
    """Coefficients shared by the whole consortium: the same customer behaviour everywhere."""

    complaints: float
    inactive: float
    login: float
    inactive_login: float  # interaction: an inactive customer who has not logged in for long
    products: tuple[float, float, float, float]  # U-shaped in the number of products
    age_hump: float  # nonlinear: churn peaks around 50
    tenure: float
    no_balance: float
    log_balance: float
    credit_score: float
    transactions: float
    utilisation: float
    female: float
    mortgage: float
    regions: tuple[float, ...]
    card_tiers: tuple[float, ...]


def _churn_model(seed: int) -> _ChurnModel:
    rng = np.random.default_rng(derive_seed("synthetic-consortium", seed))

    def jitter(value: float) -> float:
        return float(value * rng.uniform(0.8, 1.2))  # seed-dependent strength, fixed direction

    return _ChurnModel(
        complaints=jitter(0.75),
        inactive=jitter(0.8),
        login=jitter(0.5),
        inactive_login=jitter(0.5),
        products=(jitter(0.3), jitter(-0.7), jitter(1.3), jitter(2.2)),
        age_hump=jitter(1.2),
        tenure=jitter(-0.3),
        no_balance=jitter(-0.3),
        log_balance=jitter(0.2),
        credit_score=jitter(-0.2),
        transactions=jitter(-0.7),
        utilisation=jitter(-0.4),
        female=jitter(0.25),
        mortgage=jitter(-0.4),
        regions=tuple(float(v) for v in rng.normal(0.0, 0.25, size=len(_REGIONS))),
        card_tiers=(0.0, jitter(-0.1), jitter(-0.2), jitter(0.2)),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))  # type: ignore[no-any-return]


def _intercept_for_rate(score: np.ndarray, rate: float) -> float:
    """The intercept b with mean(sigmoid(b + score)) == rate (monotone in b: bisection)."""
    lo, hi = -40.0, 40.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(_sigmoid(mid + score).mean()) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def generate_synthetic_institution(synthetic: SyntheticConfig, index: int, *, seed: int) -> RawTable:
    """Institution ``index`` (0-based) of the seeded synthetic consortium, named ``bank-NN``.

    Deterministic for (synthetic config, index, seed). The churn model is shared by all institutions; size,
    churn rate, customer mix and region are each institution's own.
    """
    return _generate_synthetic(synthetic, index, seed=seed)[0]


def _generate_synthetic(synthetic: SyntheticConfig, index: int, *, seed: int) -> tuple[RawTable, np.ndarray]:
    """The table and each row's true churn probability (tests use it to check the signal's strength)."""
    profile = synthetic_profile(synthetic, index, seed=seed)
    return generate_synthetic_rows(profile, seed=seed, rows_seed=derive_seed("synthetic-rows", seed, index))


def generate_synthetic_rows(profile: SyntheticProfile, *, seed: int, rows_seed: int) -> tuple[RawTable, np.ndarray]:
    """Rows of ``profile`` under the consortium's churn model for ``seed``, drawn from ``rows_seed``.

    Also draws the consortium's source domain (fedchurn/pretraining/source_data.py): same behaviour, other customers.
    """
    model = _churn_model(seed)
    rng = np.random.default_rng(rows_seed)
    n = profile.rows
    shifts = np.asarray(profile.shifts)
    z = rng.standard_normal((n, _N_LATENT)) + shifts[:_N_LATENT]

    age = np.clip(np.round(41.0 + 11.0 * z[:, 0]), 18, 90)
    tenure = np.clip(np.round((age - 18.0) * 12.0 * _sigmoid(z[:, 1] - 0.7)), 0, 480)
    salary = np.round(np.exp(10.8 + 0.45 * z[:, 2] + 0.008 * (age - 40.0)), 2)
    has_balance = _sigmoid(0.9 + 0.8 * z[:, 3]) > rng.random(n)
    balance = np.where(has_balance, np.round(np.exp(9.3 + z[:, 3] + 0.5 * np.log(salary / 50_000.0)), 2), 0.0)
    credit_score = np.clip(np.round(650.0 + 90.0 * z[:, 4]), 350, 850)
    products = 1 + (z[:, 5] > 0.1).astype(np.int64) + (z[:, 5] > 1.6) + (z[:, 5] > 2.3)
    active = z[:, 6] > 0.0
    transactions = rng.poisson(np.exp(3.3 + 0.35 * z[:, 7] + 0.4 * active)).astype(np.float64)
    complaints = rng.poisson(np.exp(-1.5 + 0.6 * z[:, 8])).astype(np.float64)
    login_days = np.clip(np.round(np.exp(1.8 + 0.8 * z[:, 9] + 1.0 * ~active)), 0, 730)
    utilisation = np.round(_sigmoid(-1.0 + 1.2 * z[:, 10]), 3)
    mortgage = (z[:, 11] + 0.04 * (age - 40.0)) > 0.5
    female = rng.random(n) < _sigmoid(np.full(n, shifts[_N_LATENT]))
    tier_score = np.log(salary / 50_000.0) / 0.45 * 0.6 + rng.standard_normal(n) + shifts[_N_LATENT + 1]
    tier = (tier_score > 1.0).astype(np.int64) + (tier_score > 1.7) + (tier_score > 2.4)
    region_weights = np.exp(shifts[_N_LATENT + 2 :])
    region = rng.choice(len(_REGIONS), size=n, p=region_weights / region_weights.sum())

    login_c = np.log1p(login_days) - 2.3
    score = (
        model.complaints * complaints
        + model.inactive * ~active
        + model.login * login_c
        + model.inactive_login * ~active * login_c
        + np.asarray((0.0, *model.products))[products]
        + model.age_hump * np.exp(-(((age - 52.0) / 9.0) ** 2))
        + model.tenure * (tenure - 90.0) / 70.0
        + model.no_balance * ~has_balance
        + model.log_balance * np.where(has_balance, np.log1p(balance) - 9.3, 0.0)
        + model.credit_score * (credit_score - 650.0) / 90.0
        + model.transactions * (np.log1p(transactions) - 3.4) / 0.4
        + model.utilisation * (utilisation - 0.27) / 0.2
        + model.female * female
        + model.mortgage * mortgage
        + np.asarray(model.regions)[region]
        + np.asarray(model.card_tiers)[tier]
    )
    probability = _sigmoid(_intercept_for_rate(score, profile.churn_rate) + score)
    labels = (rng.random(n) < probability).astype(np.int64)

    numeric = np.column_stack(
        [
            age,
            tenure,
            balance,
            credit_score,
            salary,
            products.astype(np.float64),
            transactions,
            complaints,
            login_days,
            utilisation,
        ]
    ).astype(np.float64)
    yes_no = np.array(["yes", "no"], dtype=object)
    categorical = np.column_stack(
        [
            np.array(["F", "M"], dtype=object)[(~female).astype(np.int64)],
            np.array(_REGIONS, dtype=object)[region],
            np.array(_CARD_TIERS, dtype=object)[tier],
            yes_no[(~active).astype(np.int64)],
            yes_no[(~mortgage).astype(np.int64)],
        ]
    )
    table = RawTable(
        institution=profile.name,
        source="synthetic",
        numeric=numeric,
        categorical=categorical,
        labels=labels,
        line_numbers=np.arange(2, n + 2, dtype=np.int64),  # as in the CSV write_csv would give
        schema=SYNTHETIC_SCHEMA,
        positive_value="yes",
        negative_value="no",
    )
    return table, probability


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


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
    from fedchurn.shared.bank_random import row_coin
    from fedchurn.shared.row_identity import row_bytes

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


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# One institution, ready for training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedInstitution:
    name: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray  # float32 (n, len(feature_names))
    y_train: np.ndarray  # float32 0/1 (n,)
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    preprocessor: Preprocessor
    missing_imputed: int = 0  # blank cells filled with declared values (bounds midpoint; all-zero category)
    rows_dropped: int = 0  # rows dropped for blank cells (missing_values="drop")
    source: str = field(default="")  # where the rows came from (file path or "synthetic")
    fingerprint: str = ""  # SHA-256 of the institution's rows (shared/row_identity): its ledger's dataset


def prepare_institution(
    config: FedChurnConfig, institution: str, *, split_key: bytes | None = None
) -> PreparedInstitution:
    """Read, split, and transform the three parts with the schema's declared preprocessing.

    ``split_key`` is the bank's secret key (shared/bank_random.bank_secret_key). Without one (offline tools,
    research) the key is derived from the config's seed and the institution's name: a split the server can know.
    """
    from fedchurn.shared.bank_random import reproducible_key
    from fedchurn.shared.row_identity import file_fingerprint, table_fingerprint

    data = config.data
    staged = load_partition(data, config.output_dir, institution) if data.source == "csv" else None
    table = staged if staged is not None else read_institution(data, institution, seed=config.seed)
    split = split_institution(
        table,
        validation_fraction=data.validation_fraction,
        test_fraction=data.test_fraction,
        key=split_key if split_key is not None else reproducible_key(config.seed, institution),
    )
    path = data.institution_files.get(institution) if data.source == "csv" else None
    fingerprint = file_fingerprint(path) if path else table_fingerprint(table)
    # Declared bounds and vocabulary only: no statistic of this bank's rows enters any customer's features.
    preprocessor = Preprocessor.from_schema(table.schema)

    def labels(part: RawTable) -> np.ndarray:
        if part.labels is None:  # split_institution refuses unlabelled tables
            raise DataError(f"institution {institution!r} has no labels", path=table.source)
        return part.labels.astype(np.float32)

    prepared = PreparedInstitution(
        name=institution,
        feature_names=preprocessor.feature_names,
        x_train=preprocessor.transform(split.train),
        y_train=labels(split.train),
        x_val=preprocessor.transform(split.validation),
        y_val=labels(split.validation),
        x_test=preprocessor.transform(split.test),
        y_test=labels(split.test),
        preprocessor=preprocessor,
        missing_imputed=table.n_blank,
        rows_dropped=table.rows_dropped,
        source=table.source,
        fingerprint=fingerprint,
    )
    logger.info(
        "%s: %d train / %d validation / %d test rows, %d features, churn rate %.3f",
        institution,
        len(prepared.y_train),
        len(prepared.y_val),
        len(prepared.y_test),
        len(prepared.feature_names),
        table.n_positive / max(table.n_rows, 1),
    )
    return prepared
