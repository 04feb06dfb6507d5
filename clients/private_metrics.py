"""Evaluation statistics a bank may release under differential privacy (numpy only: no torch, no server state).

The mechanism: bin the model's churn logits on a set of rows into ``bins`` fixed, data-independent bins (equal
width over ``[-logit_range, logit_range]``; values outside fall into the two end bins) and count per class, giving
a 2×B histogram. Adding or removing one customer changes one cell by 1, so the L2 sensitivity is 1, and releasing
the histogram with Gaussian noise of std σ_e is a Gaussian mechanism with noise multiplier σ_e — for the
accountant, one step at sample rate 1. Several disjoint row sets (validation and test) released together are one
histogram of 2×B cells per set: a customer is in one set only, so the sensitivity stays 1.

Everything reported afterwards — AUC (Mann-Whitney on binned scores), PR-AUC, Brier score, log-loss and expected
calibration error from bin centres, a calibration table, positive rate — is computed from the released (noisy)
histogram only: post-processing, no further privacy cost.

The noise comes from the operating system's CSPRNG (:func:`secure_rng`), never from a configured seed: a server
that knows the run's config cannot predict or remove it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.policy import BankPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "ECE_BINS",
    "BinSpec",
    "EvaluationSettings",
    "calibration_table",
    "evaluation_settings",
    "histogram_metrics",
    "release_histogram",
    "reliability_bins",
    "score_histogram",
    "secure_rng",
]

ECE_BINS = 10  # expected calibration error over 10 equal-width probability bins (the common definition)
_EPS = 1e-12


@dataclass(frozen=True)
class BinSpec:
    """``bins`` equal-width bins over ``[-logit_range, logit_range]`` in logit space; the end bins are open."""

    bins: int
    logit_range: float

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or isinstance(self.bins, bool) or not 2 <= self.bins <= 1000:
            raise FedChurnError(f"histogram bins = {self.bins!r}: must be a whole number in [2, 1000]")
        if not math.isfinite(self.logit_range) or self.logit_range <= 0:
            raise FedChurnError(f"histogram logit_range = {self.logit_range!r}: must be a finite number > 0")

    @property
    def edges(self) -> np.ndarray:
        """The B+1 edges of the finite grid (the end bins extend beyond the first and last)."""
        return np.linspace(-self.logit_range, self.logit_range, self.bins + 1)

    @property
    def centres(self) -> np.ndarray:
        """The logit each bin stands for: the middle of its finite part."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2.0

    def index(self, logits: np.ndarray) -> np.ndarray:
        """Bin index 0..B-1 of each logit (values beyond the range, ±inf included, go to the end bins).

        A NaN logit counts as 0. Never an error: a model crafted to overflow on some rows only would otherwise
        turn "released or not" into a signal about those rows, outside the DP guarantee.
        """
        x = np.nan_to_num(np.asarray(logits, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        width = 2.0 * self.logit_range / self.bins
        return np.clip(np.floor((x + self.logit_range) / width), 0, self.bins - 1).astype(np.int64)


@dataclass(frozen=True)
class EvaluationSettings:
    """How a bank releases evaluation statistics: ``off`` (nothing about validation/test rows leaves) or ``dp``."""

    mode: str  # "off" | "dp"
    noise_multiplier: float  # σ_e: Gaussian noise std per histogram cell (sensitivity 1)
    spec: BinSpec
    every_rounds: int  # 0: release after the run's last round only; k: also after every k-th trained round

    @property
    def enabled(self) -> bool:
        return self.mode == "dp"

    def planned_releases(self, rounds: int) -> int:
        """Releases a bank makes in a run of ``rounds`` rounds it trains in full: for planning σ to a target ε,
        each is one more accountant step (noise_multiplier σ_e, sample_rate 1, steps 1)."""
        if not self.enabled or rounds < 1:
            return 0
        if self.every_rounds == 0:
            return 1
        return rounds // self.every_rounds + (1 if rounds % self.every_rounds else 0)


def evaluation_settings(config: FedChurnConfig, *, policy: BankPolicy) -> EvaluationSettings:
    """The evaluation settings a bank follows. Every reader of them goes through this one function.

    The run's ``evaluation`` section says what the server asks for; the bank's own policy bounds it: its
    ``evaluation: off`` turns releases off whatever the run asks, and σ_e is never below the policy's
    ``evaluation_noise_multiplier``.
    """
    section = config.evaluation
    mode = "off" if policy.evaluation == "off" else section.mode
    return EvaluationSettings(
        mode=mode,
        noise_multiplier=max(float(section.noise_multiplier), float(policy.evaluation_noise_multiplier)),
        spec=BinSpec(bins=int(section.bins), logit_range=float(section.logit_range)),
        every_rounds=int(section.every_rounds),
    )


def secure_rng() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG: unknown to the server, fresh on every call."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def score_histogram(logits: np.ndarray, labels: np.ndarray, spec: BinSpec) -> np.ndarray:
    """Exact counts, shape (2, B): row 0 non-churners, row 1 churners, per logit bin."""
    y = np.asarray(labels).reshape(-1)
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise FedChurnError(f"{x.shape[0]} logits for {y.shape[0]} labels: they must describe the same rows")
    if not np.isin(y, (0, 1)).all():
        raise FedChurnError("labels must be 0 or 1")
    index = spec.index(x)
    counts = np.zeros((2, spec.bins), dtype=np.float64)
    np.add.at(counts, (y.astype(np.int64), index), 1.0)
    return counts


def release_histogram(counts: np.ndarray, *, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """``counts`` plus independent N(0, σ_e²) noise in every cell (the Gaussian mechanism; sensitivity 1)."""
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise FedChurnError(f"evaluation noise multiplier = {noise_multiplier!r}: must be a finite number > 0")
    counts = np.asarray(counts, dtype=np.float64)
    return counts + rng.normal(0.0, noise_multiplier, size=counts.shape)


# --------------------------------------------------------------------------------------------------
# Post-processing: metrics of a (released) histogram
# --------------------------------------------------------------------------------------------------


def _clean(histogram: np.ndarray) -> np.ndarray:
    """Noisy counts clipped at 0 (a count is never negative): still post-processing."""
    return np.clip(_checked(histogram), 0.0, None)


def _checked(histogram: np.ndarray) -> np.ndarray:
    h = np.asarray(histogram, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != 2:
        raise FedChurnError(f"a score histogram has shape (2, bins), got {h.shape}")
    return h


def histogram_auc(histogram: np.ndarray) -> float:
    """ROC-AUC of the binned scores (Mann-Whitney U; rows in one bin tie, counting one half). NaN if a class is empty.

    Bins are ordered by score, so each churner beats the non-churners of every lower bin. The noisy counts are used
    as released, not clipped: U is a sum of products of independent cells, so its noise has mean zero (clipping
    every empty cell at 0 would add about 0.4 σ_e phantom rows to each). The ratio is clamped to [0, 1].
    """
    h = _checked(histogram)
    neg, pos = h[0], h[1]
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg < 1.0 or n_pos < 1.0:
        return math.nan
    below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    u = float(np.sum(pos * (below + 0.5 * neg)))
    return min(1.0, max(0.0, u / (n_pos * n_neg)))


def histogram_pr_auc(histogram: np.ndarray) -> float:
    """Average precision with one threshold per bin, highest bin first (as scikit-learn treats tied scores)."""
    h = _clean(histogram)
    neg, pos = h[0][::-1], h[1][::-1]
    n_pos = float(pos.sum())
    if n_pos < 1.0:
        return math.nan
    tps = np.cumsum(pos)
    predicted = np.cumsum(pos + neg)
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted > 0)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def calibration_table(
    histogram: np.ndarray, probabilities: np.ndarray, *, groups: int = ECE_BINS
) -> list[dict[str, float]]:
    """Rows grouped by predicted probability into ``groups`` equal-width bins: count, mean predicted, churn rate.

    ``probabilities[j]`` is the probability the model gives every row of histogram bin j. Sums of noisy counts are
    taken as released (mean-zero noise); groups whose count is not positive are left out, rates clipped to [0, 1].
    """
    h = _checked(histogram)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (h.shape[1],):
        raise FedChurnError(f"{p.shape} probabilities for {h.shape[1]} histogram bins")
    group = np.clip(np.floor(p * groups), 0, groups - 1).astype(np.int64)
    total = h[0] + h[1]
    table = []
    for g in range(groups):
        members = group == g
        n = float(total[members].sum())
        if n <= 0.0:
            continue
        table.append(
            {
                "low": g / groups,
                "high": (g + 1) / groups,
                "count": n,
                "mean_probability": float(np.sum(total[members] * p[members]) / n),
                "churn_rate": float(np.clip(h[1][members].sum() / n, 0.0, 1.0)),
            }
        )
    return table


def reliability_bins(histogram: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per histogram bin j: the probability its rows are given, its churn rate and its row count (post-processing).

    Counts are the (noisy) released ones: a bin's rows are clipped at 0 and its rate, churners / rows clipped to
    [0, 1], is NaN where the rows are not positive. ``probabilities[j]`` as in :func:`calibration_table`.
    """
    h = _checked(histogram)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if p.shape != (h.shape[1],):
        raise FedChurnError(f"{p.shape} probabilities for {h.shape[1]} histogram bins")
    total = h[0] + h[1]
    positive = total > 0.0
    rate = np.full(total.shape, np.nan)
    rate[positive] = np.clip(h[1][positive] / total[positive], 0.0, 1.0)
    return p, rate, np.clip(total, 0.0, None)


def expected_calibration_error(table: Sequence[dict[str, float]]) -> float:
    """Σ_g (n_g / n) |churn rate_g − mean predicted_g| over the rows of a calibration table. NaN if empty."""
    n = sum(row["count"] for row in table)
    if n <= 0:
        return math.nan
    return float(sum(row["count"] / n * abs(row["churn_rate"] - row["mean_probability"]) for row in table))


def histogram_metrics(histogram: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Every metric a bank reports, from a (released) histogram and the probability of each bin.

    ``auc``, ``pr_auc`` (ranking: independent of calibration), ``brier``, ``log_loss``, ``ece``,
    ``mean_probability``, ``churn_rate`` and ``count`` (noisy row count). NaN where a class is empty. Sums over
    cells use the released counts unclipped (their noise has mean zero); only PR-AUC reads clipped counts.
    """
    h = _checked(histogram)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    neg, pos = h[0], h[1]
    n = float(h.sum())
    table = calibration_table(h, p)
    if n < 1.0:
        nan = math.nan
        return {
            "auc": nan,
            "pr_auc": nan,
            "brier": nan,
            "log_loss": nan,
            "ece": nan,
            "mean_probability": nan,
            "churn_rate": nan,
            "count": n,
        }
    brier = float(max(0.0, np.sum(pos * (1.0 - p) ** 2 + neg * p**2) / n))
    q = np.clip(p, _EPS, 1.0 - _EPS)
    log_loss = float(max(0.0, -np.sum(pos * np.log(q) + neg * np.log1p(-q)) / n))
    return {
        "auc": histogram_auc(h),
        "pr_auc": histogram_pr_auc(h),
        "brier": brier,
        "log_loss": log_loss,
        "ece": expected_calibration_error(table),
        "mean_probability": float(np.clip(np.sum((pos + neg) * p) / n, 0.0, 1.0)),
        "churn_rate": float(np.clip(pos.sum() / n, 0.0, 1.0)),
        "count": n,
    }
