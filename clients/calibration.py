"""Calibrated churn probabilities and fixed risk deciles (numpy only).

A bank fits Platt scaling, p = sigmoid(a·logit + b), on its own *released* validation histogram
(``clients/private_metrics.py``): every histogram bin stands for its centre logit with its (noisy, clipped) churner
and non-churner counts as weights. The fit reads nothing but the released histogram, so it is post-processing and
costs no privacy beyond that release. The slope is kept positive, so calibration never reorders customers.

Risk-decile thresholds are the 10 %, ..., 90 % quantiles of the same histogram's score distribution
(interpolated within bins): fixed once at the bank, a customer's decile depends on their own score only, never
on which other customers are in the file being scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedchurn.shared.errors import FedChurnError

__all__ = ["Calibrator", "decile_thresholds", "fit_platt", "fit_platt_histogram"]

_MIN_SLOPE = 1e-3  # a slope at or below 0 would flatten or reverse the ranking
_RIDGE = 1e-6
TAIL_SLOPE = 1e-3  # beyond the calibrated range: strictly increasing, nearly flat


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable at any z


@dataclass(frozen=True)
class Calibrator:
    """Platt scaling plus the bank's fixed decile thresholds (both in the model's logit space)."""

    a: float
    b: float
    thresholds: tuple[float, ...] = ()  # 9 increasing logits: the 10 %, ..., 90 % quantiles
    # The fit saw every logit beyond the histogram's end-bin centres AT those centres: probabilities use the same
    # clamped logit (plus TAIL_SLOPE times the excess, so customers are never tied or reordered). Without it a
    # model whose logits reach far past the grid gets tail probabilities the fit never matched (measured: mean
    # probability 0.15 for a churn rate of 0.19).
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a <= 0:
            raise FedChurnError(f"calibrator (a={self.a!r}, b={self.b!r}): a must be finite and > 0, b finite")
        t = tuple(float(v) for v in self.thresholds)
        if t and (len(t) != 9 or any(not math.isfinite(v) for v in t) or bool(np.any(np.diff(t) < 0))):
            raise FedChurnError(f"decile thresholds must be 9 finite increasing numbers, got {t}")
        object.__setattr__(self, "thresholds", t)
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise FedChurnError(f"calibrator range [{self.low!r}, {self.high!r}]: must be an interval")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        inside = np.clip(x, self.low, self.high)
        return _sigmoid(self.a * inside + self.b + TAIL_SLOPE * (x - inside))

    def deciles(self, logits: np.ndarray) -> np.ndarray:
        """Risk decile 1..10 (10 = highest risk) of each logit against the stored thresholds."""
        if not self.thresholds:
            raise FedChurnError("this calibrator holds no decile thresholds")
        x = np.asarray(logits, dtype=np.float64)
        return np.searchsorted(np.asarray(self.thresholds), x, side="right").astype(np.int64) + 1

    def moved(self, offset: float) -> Calibrator:
        """This calibrator, fitted on logits − ``offset``, as one for the logits themselves."""
        return Calibrator(
            a=self.a,
            b=self.b - self.a * offset,
            thresholds=tuple(t + offset for t in self.thresholds),
            low=self.low + offset,
            high=self.high + offset,
        )

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "method": "platt",
            "a": self.a,
            "b": self.b,
            "decile_logit_thresholds": list(self.thresholds),
        }
        if math.isfinite(self.low) and math.isfinite(self.high):
            values["logit_range"] = [self.low, self.high]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Calibrator:
        try:
            if values.get("method") != "platt":
                raise ValueError(f"method {values.get('method')!r}")
            low, high = (float(v) for v in values.get("logit_range", (-math.inf, math.inf)))
            return cls(
                a=float(values["a"]),
                b=float(values["b"]),
                thresholds=tuple(float(v) for v in values.get("decile_logit_thresholds", ())),
                low=low,
                high=high,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FedChurnError(f"calibration record cannot be read ({exc}): re-run the federation") from None


def fit_platt(logits: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(a, b) maximising Σ pos·log σ(a x + b) + neg·log(1 − σ(a x + b)) by Newton's method.

    ``positives`` / ``negatives`` are per-point weights (counts); for plain labelled rows give y and 1 − y.
    """
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    w1 = np.clip(np.asarray(positives, dtype=np.float64).reshape(-1), 0.0, None)
    w0 = np.clip(np.asarray(negatives, dtype=np.float64).reshape(-1), 0.0, None)
    if not (x.shape == w1.shape == w0.shape):
        raise FedChurnError("logits, positives and negatives must have one entry per point")
    n1, n0 = float(w1.sum()), float(w0.sum())
    if n1 <= 0 or n0 <= 0:
        raise FedChurnError("Platt scaling needs both churners and non-churners")
    w = w1 + w0
    a, b = 1.0, math.log(n1 / n0) - float(np.sum(w * x) / np.sum(w))
    for _ in range(300):
        p = _sigmoid(a * x + b)
        r = w1 - w * p  # gradient of the log-likelihood w.r.t. z = a x + b
        g = np.array([np.sum(r * x) - _RIDGE * a, np.sum(r) - _RIDGE * b])
        v = w * p * (1.0 - p)
        h = np.array([[np.sum(v * x * x) + _RIDGE, np.sum(v * x)], [np.sum(v * x), np.sum(v) + _RIDGE]])
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            break
        # Damped: a full Newton step from a poor start can overshoot into saturation, where the curvature
        # vanishes and the next step is huge (measured: a = 1e10 on a well-separated bank).
        step *= min(1.0, 1.0 / max(float(np.max(np.abs(step))), 1e-12))
        a, b = a + float(step[0]), b + float(step[1])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise FedChurnError("Platt scaling diverged (the scores separate the classes perfectly?)")
        if float(np.max(np.abs(step))) < 1e-10:
            break
    if a < _MIN_SLOPE:  # the best monotone fit: a flat line at the base rate
        a = _MIN_SLOPE
        b = math.log(n1 / n0) - a * float(np.sum(w * x) / np.sum(w))
    return a, b


KEEP_SIGMAS = 2.0  # a bin joins the fit when its noisy row count is above this many noise stds


def fit_platt_histogram(
    histogram: np.ndarray, centres: np.ndarray, *, noise_multiplier: float = 0.0
) -> tuple[float, float]:
    """Platt scaling from a released 2×B score histogram whose bins stand for the logits ``centres``.

    ``noise_multiplier``: the std σ_e of the noise in each released cell (0: exact counts). A DP-trained model
    often puts every row in two or three bins (measured on BankChurners at ε = 3: all logits in [−8, −2.6]); the
    other bins hold noise only. Fitting the noisy counts as released lets those empty bins' noise, times
    probabilities near 1, swing the fit (measured: mean probability 0.08 for a bank with churn rate 0.18); clipping
    every cell at 0 instead adds about 0.4 σ_e phantom rows to every empty bin and drags the slope to 0. So the fit
    keeps the bins whose noisy row count stands above KEEP_SIGMAS noise stds (σ_e·√2: two cells), where clipping
    at 0 changes almost nothing, and weights each kept centre by its clipped counts. With fewer than two kept bins,
    or no positive slope, the slope is fixed at 1 and only the intercept is fitted (the mean matches the churn
    rate of the kept rows).
    """
    h = np.asarray(histogram, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != 2 or c.shape != (h.shape[1],):
        raise FedChurnError(f"a histogram of shape (2, {c.shape[0]}) is needed, got {h.shape}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise FedChurnError(f"noise multiplier {noise_multiplier!r}: must be a finite number >= 0")
    total = h[0] + h[1]
    keep = total > KEEP_SIGMAS * noise_multiplier * math.sqrt(2.0)
    pos = np.clip(h[1][keep], 0.0, None)
    neg = np.clip(h[0][keep], 0.0, None)
    centres_kept = c[keep]
    if not (pos.sum() > 0.0 and neg.sum() > 0.0):
        raise FedChurnError("Platt scaling needs both churners and non-churners")
    if int(keep.sum()) >= 2:
        a, b = fit_platt(centres_kept, pos, neg)
        if a > _MIN_SLOPE and math.isfinite(b):
            return a, b
    return 1.0, _intercept(centres_kept, pos, pos + neg)


def _intercept(c: np.ndarray, pos: np.ndarray, total: np.ndarray) -> float:
    """b with Σ_j n_j σ(c_j + b) = Σ_j pos_j (noisy sums as released; n_j clipped at 0 keeps it monotone)."""
    target = float(np.clip(pos.sum(), 0.0, None))
    weight = np.clip(total, 0.0, None)
    target = min(target, float(weight.sum()))
    low, high = -50.0, 50.0
    for _ in range(200):
        middle = (low + high) / 2
        if float(np.sum(weight * _sigmoid(c + middle))) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def decile_thresholds(histogram: np.ndarray, edges: np.ndarray) -> tuple[float, ...]:
    """The 10 %, ..., 90 % quantiles of the histogram's scores, linear within each bin (logit space).

    The cumulative count is built from the counts as released (mean-zero noise; clipping each empty cell at 0
    would pile phantom rows into every empty bin), then made non-decreasing.
    """
    h = np.asarray(histogram, dtype=np.float64)
    total = h.sum(axis=0)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.shape != (total.shape[0] + 1,):
        raise FedChurnError(f"{edges.shape[0]} edges for {total.shape[0]} bins")
    n = float(total.sum())
    if n <= 0:
        raise FedChurnError("an empty histogram has no quantiles")
    cumulative = np.clip(np.maximum.accumulate(np.concatenate(([0.0], np.cumsum(total)))), 0.0, n) / n
    cumulative[-1] = 1.0
    thresholds = []
    for k in range(1, 10):
        level = k / 10.0
        j = int(np.clip(np.searchsorted(cumulative, level, side="left") - 1, 0, total.shape[0] - 1))
        inside = (level - cumulative[j]) / max(cumulative[j + 1] - cumulative[j], 1e-300)
        thresholds.append(float(edges[j] + np.clip(inside, 0.0, 1.0) * (edges[j + 1] - edges[j])))
    return tuple(np.maximum.accumulate(np.asarray(thresholds)).tolist())
