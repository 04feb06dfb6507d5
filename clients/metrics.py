"""Binary churn metrics in pure numpy: ROC-AUC, PR-AUC (average precision), Brier score, accuracy, risk deciles.

No torch, no scikit-learn: the server and the CLI use these without a training stack. Definitions follow
scikit-learn's (``roc_auc_score``, ``average_precision_score``, ``brier_score_loss``) and are cross-checked
against it in the tests where it is installed.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "accuracy",
    "binary_metrics",
    "brier_score",
    "calibration_table",
    "expected_calibration_error",
    "pr_auc",
    "risk_deciles",
    "roc_auc",
]


def _labels(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be a 1-D array of 0/1 labels, got shape {y.shape} (flatten it first)")
    if y.size == 0:
        raise ValueError("y_true is empty: metrics need at least one row")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true must hold numbers 0/1, got dtype {y.dtype} (map the churn label to 0/1 first)")
    bad = ~np.isin(y, (0, 1))  # NaN is never in {0, 1}, so it is caught here too
    if bad.any():
        examples = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"y_true must hold only 0 and 1, found {examples} (map the churn label to 0/1 first)")
    return y.astype(np.int64)


def _scores(scores: np.ndarray, n: int, *, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {s.shape} (flatten it, e.g. logits.reshape(-1))")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} entries but y_true has {n}: they must describe the same rows")
    if s.dtype == bool or not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(s)).sum())} NaN/inf values: check the model output")
    return s


def _probabilities(probabilities: np.ndarray, n: int) -> np.ndarray:
    p = _scores(probabilities, n, name="probabilities")
    if (p < 0.0).any() or (p > 1.0).any():
        raise ValueError(
            "probabilities must lie in [0, 1], found values in "
            f"[{p.min():.4g}, {p.max():.4g}] (apply a sigmoid to logits first)"
        )
    return p


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    averages = ends - (counts - 1) / 2.0  # mean of the ranks end-count+1 .. end
    return averages[inverse]


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); ties count one half. NaN if one class only."""
    y = _labels(y_true)
    s = _scores(scores, y.shape[0], name="scores")
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        logger.debug("roc_auc is undefined with one class only (%d positives, %d negatives)", n_pos, n_neg)
        return math.nan
    ranks = _average_ranks(s)
    u = float(ranks[y == 1].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def pr_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over score thresholds of (R_k - R_{k-1}) P_k, as scikit-learn computes it.

    Tied scores form one threshold (no interpolation). NaN when there is no positive row.
    """
    y = _labels(y_true)
    s = _scores(scores, y.shape[0], name="scores")
    n_pos = int(y.sum())
    if n_pos == 0:
        logger.debug("pr_auc is undefined without positive rows")
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each run of equal scores: one threshold per distinct score
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.shape[0] - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    precision = tps / predicted
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference between the predicted churn probability and the 0/1 outcome (lower is better)."""
    y = _labels(y_true)
    p = _probabilities(probabilities, y.shape[0])
    return float(np.mean((p - y) ** 2))


def accuracy(y_true: np.ndarray, probabilities: np.ndarray, *, threshold: float = 0.5) -> float:
    """Share of rows where (probability >= threshold) equals the label."""
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    y = _labels(y_true)
    p = _probabilities(probabilities, y.shape[0])
    return float(np.mean((p >= threshold).astype(np.int64) == y))


def calibration_table(y_true: np.ndarray, probabilities: np.ndarray, *, bins: int = 10) -> list[dict[str, float]]:
    """Rows grouped into ``bins`` equal-width probability bins ([0, 0.1), ..., [0.9, 1]): count, mean predicted
    probability and observed churn rate per non-empty bin."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a whole number >= 1, got {bins!r}")
    y = _labels(y_true)
    p = _probabilities(probabilities, y.shape[0])
    group = np.clip(np.floor(p * bins), 0, bins - 1).astype(np.int64)
    table = []
    for g in range(bins):
        members = group == g
        n = int(members.sum())
        if n:
            table.append(
                {
                    "low": g / bins,
                    "high": (g + 1) / bins,
                    "count": float(n),
                    "mean_probability": float(p[members].mean()),
                    "churn_rate": float(y[members].mean()),
                }
            )
    return table


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, *, bins: int = 10) -> float:
    """Σ_b (n_b / n) |churn rate_b − mean predicted probability_b| over ``bins`` equal-width probability bins."""
    table = calibration_table(y_true, probabilities, bins=bins)
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] / n * abs(row["churn_rate"] - row["mean_probability"]) for row in table))


def binary_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """``{"auc", "pr_auc", "brier", "accuracy"}`` for churn probabilities (AUC and PR-AUC may be NaN)."""
    return {
        "auc": roc_auc(y_true, probabilities),
        "pr_auc": pr_auc(y_true, probabilities),
        "brier": brier_score(y_true, probabilities),
        "accuracy": accuracy(y_true, probabilities),
    }


def risk_deciles(probabilities: np.ndarray) -> np.ndarray:
    """Decile 1..10 of each row by rank within ``probabilities``; 10 = highest risk.

    Rank i (0-based, ascending, ties in input order) falls in decile floor(10 i / n) + 1, so deciles hold
    n/10 rows each (±1) even when many scores are equal.
    """
    p = np.asarray(probabilities)
    if p.ndim != 1:
        raise ValueError(f"probabilities must be a 1-D array, got shape {p.shape}")
    p = _scores(p, p.shape[0], name="probabilities")
    n = p.shape[0]
    deciles = np.empty(n, dtype=np.int64)
    order = np.argsort(p, kind="stable")
    deciles[order] = np.arange(n, dtype=np.int64) * 10 // max(n, 1) + 1
    return deciles
