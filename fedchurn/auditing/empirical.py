"""An empirical LOWER bound on ε from one training run (Steinke, Nasr & Jagielski, "Privacy auditing with one (1)
training run", 2023): the statistics. The canary run itself is ``clients/empirical_run.py``.

The one-run audit: m canaries, each included in the training data independently with probability 1/2 (S_i = +1
included, −1 not). After training, each canary gets a score (higher: more likely included); the auditor guesses
"included" for the k+ highest scores, "excluded" for the k− lowest, and abstains on the rest: r = k+ + k− guesses,
v of them correct. The paper's theorem (approximate DP): if training is (ε, δ)-DP with respect to adding/removing
one canary, then for every v

    P[correct ≥ v] ≤ P[W ≥ v] + δ · max_{i=1..m} (2m / i) · P[v − i ≤ W < v],   W ~ Binomial(r, e^ε / (1 + e^ε)).

So observing v correct guesses rejects (ε, δ)-DP at confidence 1 − β whenever that right-hand side is ≤ β; the
empirical lower bound is the largest such ε (the right-hand side grows with ε; found by bisection). A lower bound
is evidence, not a guarantee: it can expose a broken implementation (a bound above the claimed ε), never prove one
correct, and a one-run audit with few canaries is far from tight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

__all__ = ["Guesses", "epsilon_lower_bound", "guess", "tail_bound"]


def tail_bound(*, epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """The theorem's bound on P[correct ≥ v] for an (ε, δ)-DP mechanism (see the module docstring)."""
    p = math.exp(epsilon) / (1.0 + math.exp(epsilon)) if epsilon < 700 else 1.0
    at_least_v = float(binom.sf(v - 1, r, p))  # P[W >= v]
    if delta == 0.0:
        return at_least_v
    i = np.arange(1, m + 1)
    window = binom.sf(v - i - 1, r, p) - at_least_v  # P[v - i <= W < v] = P[W >= v - i] - P[W >= v]
    return at_least_v + delta * float(np.max(2.0 * m / i * window))


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float, upper: float = 50.0) -> float:
    """The largest ε that v correct guesses out of r reject at confidence 1 − β (0 when none is rejected)."""
    if not (0 < beta < 1) or not (0 <= delta < 1) or not (0 <= v <= r <= m):
        raise ValueError(f"need 0 < beta < 1, 0 <= delta < 1 and 0 <= v <= r <= m; got {beta}, {delta}, {v}, {r}, {m}")
    if tail_bound(epsilon=0.0, delta=delta, m=m, r=r, v=v) > beta:
        return 0.0  # not even ε = 0 is rejected
    low, high = 0.0, upper
    if tail_bound(epsilon=high, delta=delta, m=m, r=r, v=v) <= beta:
        return high
    for _ in range(60):
        mid = (low + high) / 2
        if tail_bound(epsilon=mid, delta=delta, m=m, r=r, v=v) <= beta:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Guesses:
    m: int  # canaries
    r: int  # guesses made (k+ + k−)
    v: int  # correct guesses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def guess(scores: np.ndarray, included: np.ndarray, *, k_positive: int, k_negative: int) -> Guesses:
    """Guess "included" for the k+ highest scores and "excluded" for the k− lowest; count the correct guesses."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,) or k_positive < 0 or k_negative < 0 or k_positive + k_negative > m:
        raise ValueError("need one inclusion flag per score and k+ + k− <= m")
    order = np.argsort(scores, kind="stable")
    top = order[m - k_positive :] if k_positive else order[:0]
    bottom = order[:k_negative]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return Guesses(m=m, r=k_positive + k_negative, v=correct)
