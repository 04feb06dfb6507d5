"""fedchurn.clients.metrics against hand-computed values, edge cases, and (where installed) scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedchurn.clients.metrics import accuracy, binary_metrics, brier_score, pr_auc, risk_deciles, roc_auc

Y = np.array([0, 0, 1, 1])
S = np.array([0.1, 0.4, 0.35, 0.8])


def test_hand_computed_example() -> None:
    # pairs (pos, neg): (.35,.1) ok, (.35,.4) wrong, (.8,.1) ok, (.8,.4) ok -> 3/4
    assert roc_auc(Y, S) == pytest.approx(0.75)
    # thresholds .8 (P=1, R=.5), .4 (P=.5, R=.5), .35 (P=2/3, R=1): .5*1 + .5*2/3
    assert pr_auc(Y, S) == pytest.approx(5 / 6)
    assert brier_score(Y, S) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert accuracy(Y, S) == pytest.approx(0.75)  # predicts 0, 0, 0, 1
    assert accuracy(Y, S, threshold=0.9) == pytest.approx(0.5)  # predicts no churn at all


def test_ties_count_one_half_and_form_one_threshold() -> None:
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.2, 0.9])
    assert roc_auc(y, s) == pytest.approx(3.5 / 4)  # the tied (pos, neg) pair counts 1/2
    # thresholds .9 (P=1, R=.5), .5 (P=2/3, R=1), .2 (P=1/2, R=1)
    assert pr_auc(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    same = np.full(6, 0.3)
    y6 = np.array([1, 0, 0, 1, 0, 0])
    assert roc_auc(y6, same) == pytest.approx(0.5)
    assert pr_auc(y6, same) == pytest.approx(2 / 6)  # one threshold: precision = prevalence


def test_perfect_and_reversed_ranking() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(y, s) == 1.0
    assert pr_auc(y, s) == pytest.approx(1.0)
    assert roc_auc(y, 1 - s) == 0.0


def test_single_class() -> None:
    assert math.isnan(roc_auc(np.zeros(4), S))
    assert math.isnan(roc_auc(np.ones(4), S))
    assert math.isnan(pr_auc(np.zeros(4), S))
    assert pr_auc(np.ones(4), S) == pytest.approx(1.0)
    metrics = binary_metrics(np.zeros(4), S)
    assert set(metrics) == {"auc", "pr_auc", "brier", "accuracy"}
    assert math.isnan(metrics["auc"])


def test_brier_and_accuracy_threshold() -> None:
    assert brier_score(np.array([0, 1]), np.array([0.2, 0.6])) == pytest.approx(0.1)
    assert brier_score(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
    assert accuracy(np.array([1, 0]), np.array([0.5, 0.49])) == 1.0  # p >= threshold predicts churn
    assert binary_metrics(Y, S) == pytest.approx({"auc": 0.75, "pr_auc": 5 / 6, "brier": 0.158125, "accuracy": 0.75})


def test_inputs_accept_bool_and_float_labels() -> None:
    assert roc_auc(Y.astype(bool), S) == roc_auc(Y.astype(float), S) == 0.75


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        (np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]), "only 0 and 1"),
        (np.array([0, 1, np.nan]), np.array([0.1, 0.2, 0.3]), "only 0 and 1"),
        (np.array(["no", "yes"]), np.array([0.1, 0.2]), "numbers 0/1"),
        (np.array([0, 1]), np.array([0.1, 0.2, 0.3]), "same rows"),
        (np.array([[0, 1]]), np.array([0.1, 0.2]), "1-D"),
        (np.array([0, 1]), np.array([[0.1, 0.2]]), "1-D"),
        (np.array([0, 1]), np.array([0.1, np.nan]), "NaN/inf"),
        (np.array([0, 1]), np.array([0.1, np.inf]), "NaN/inf"),
        (np.array([], dtype=int), np.array([]), "empty"),
    ],
)
def test_input_errors(y: np.ndarray, s: np.ndarray, message: str) -> None:
    for metric in (roc_auc, pr_auc, brier_score, accuracy):
        with pytest.raises(ValueError, match=message):
            metric(y, s)


def test_probabilities_must_be_probabilities() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        brier_score(np.array([0, 1]), np.array([-0.5, 2.0]))
    with pytest.raises(ValueError, match="threshold"):
        accuracy(Y, S, threshold=1.5)
    assert roc_auc(np.array([0, 1]), np.array([-3.0, 2.0])) == 1.0  # ranking metrics take any score (logits)


def test_risk_deciles() -> None:
    p = np.linspace(0.0, 1.0, 20)
    assert risk_deciles(p).tolist() == [d for d in range(1, 11) for _ in range(2)]
    assert risk_deciles(p[::-1]).tolist() == [d for d in range(10, 0, -1) for _ in range(2)]
    # ties keep input order, so equal scores still fill the deciles evenly
    assert risk_deciles(np.full(10, 0.2)).tolist() == list(range(1, 11))
    assert risk_deciles(np.array([0.9, 0.1, 0.5])).tolist() == [7, 1, 4]
    deciles = risk_deciles(np.random.default_rng(0).random(1003))
    assert deciles.dtype.kind == "i"
    counts = np.bincount(deciles, minlength=11)[1:]
    assert counts.min() >= 100 and counts.max() <= 101
    assert risk_deciles(np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        risk_deciles(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        risk_deciles(np.zeros((2, 2)))


def test_against_sklearn_on_random_data() -> None:
    from sklearn import metrics as sk  # a runtime dependency (compare's baselines): never skipped

    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(2, 400))
        y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
        y[0], y[1] = 0, 1  # both classes
        p = rng.random(n)
        if trial % 2:
            p = np.round(p, 1)  # many ties
        assert roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
        assert pr_auc(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
        assert brier_score(y, p) == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)
        assert accuracy(y, p) == pytest.approx(sk.accuracy_score(y, (p >= 0.5).astype(int)), abs=1e-12)
