"""The seeded synthetic consortium: banks of different sizes, churn rates and customer mixes under one churn model.

Public and reproducible: every table follows from (``data.synthetic``, the institution's index, the seed). Banks
in a simulation read their rows from here; tests and benchmarks use it as a stand-in for real customer tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import SchemaConfig, SyntheticConfig
from fedchurn.shared.raw_table import RawTable

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


def synthetic_name(index: int) -> str:
    return f"bank-{index + 1:02d}"


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
    return SyntheticProfile(synthetic_name(index), rows, churn_rate, tuple(float(s) for s in shifts))


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
