"""Calibration from DP-released histograms: known-logit cases, the fit's numerics, what the release counts."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fedchurn.clients.calibration import Calibrator, fit_platt, fit_platt_histogram
from fedchurn.clients.metrics import expected_calibration_error
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.private_evaluation import calibrator_from_releases, exact_histograms, reference_logit
from fedchurn.clients.private_metrics import BinSpec, EvaluationSettings, release_histogram, score_histogram
from fedchurn.shared.config import default_config
from fedchurn.shared.institution_rows import institution_names
from fedchurn.shared.model import build_model

SPEC = BinSpec(bins=10, logit_range=6.0)


def _rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """True log-odds t (churn rate about 0.2) and labels drawn from them; the model's logit is 0.5 t − 6: squeezed
    and pushed far down, as DP-SGD with clipping leaves an imbalanced table (all probabilities near 0)."""
    t = rng.normal(-2.0, 1.8, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-t))).astype(np.int64)
    return 0.5 * t - 6.0, y


@pytest.mark.parametrize(("bins", "max_ece"), [(10, 0.045), (20, 0.03)])
def test_a_squeezed_shifted_model_is_calibrated_from_noisy_releases(bins: int, max_ece: float) -> None:
    """Known logits: the right calibration is p = σ(2 (x + 6)). From releases at σ_e = 5 of 1500 training,
    300 validation and 400 test rows, the bank's calibrator must get the mean and the ECE right on fresh rows.
    Measured medians: ECE 0.036 with 10 bins (bin centres stand for bins 1.2 wide: the fitted slope is
    attenuated), 0.028 with 20; the mean within 6 % of the rate with either."""
    spec = BinSpec(bins=bins, logit_range=6.0)
    settings = EvaluationSettings(mode="dp", noise_multiplier=5.0, spec=spec, every_rounds=0)
    rng = np.random.default_rng(7)
    offset = -6.5  # what a model's reference logit might be: near, not at, the middle of its logits
    x_new, y_new = _rows(rng, 200_000)  # fresh rows: the ECE measured here has almost no sampling noise
    oracle = expected_calibration_error(y_new, 1.0 / (1.0 + np.exp(-2.0 * (x_new + 6.0))))
    means, eces = [], []
    for _ in range(20):
        sets = [_rows(rng, n) for n in (300, 400, 1500)]  # validation, test, training
        exact = np.concatenate([score_histogram(x - offset, y, spec) for x, y in sets])
        released = release_histogram(exact, noise_multiplier=5.0, rng=rng)
        centred, source = calibrator_from_releases(released[:2], released[2:4], settings, train_hist=released[4:])
        assert source == "training+validation"
        p = centred.moved(offset).probabilities(x_new)
        means.append(float(p.mean()))
        eces.append(expected_calibration_error(y_new, p))
    rate = float(y_new.mean())
    assert abs(np.median(means) - rate) < 0.1 * rate
    assert np.median(eces) < max_ece and oracle < 0.005
    # Without the model's own (uncentred) logits falling in the grid, the old validation-only fit was far off:
    # the uncalibrated model says about 1 %.
    assert float(np.mean(1.0 / (1.0 + np.exp(-x_new)))) < 0.2 * rate


def test_moved_calibrator_scores_raw_logits_as_the_centred_one_scores_centred_ones() -> None:
    centred = Calibrator(a=1.7, b=-0.4, thresholds=tuple(np.linspace(-4, 4, 9)), low=-5.4, high=5.4)
    moved = centred.moved(-3.0)
    x = np.linspace(-20, 10, 301)
    np.testing.assert_allclose(moved.probabilities(x), centred.probabilities(x + 3.0), rtol=1e-12)
    np.testing.assert_array_equal(moved.deciles(x), centred.deciles(x + 3.0))
    assert (moved.low, moved.high) == pytest.approx((-8.4, 2.4))


def test_clamped_probabilities_never_tie_or_reorder_and_survive_the_record() -> None:
    calibrator = Calibrator(a=2.0, b=0.5, low=-1.0, high=1.0)
    x = np.array([-50.0, -3.0, -1.0, 0.0, 1.0, 3.0, 50.0])
    p = calibrator.probabilities(x)
    assert np.all(np.diff(p) > 0)
    # Inside the range: plain Platt; beyond it: nearly the value at the edge.
    assert p[3] == pytest.approx(1.0 / (1.0 + math.exp(-0.5)))
    assert p[0] == pytest.approx(1.0 / (1.0 + math.exp(1.5)), rel=0.06)
    again = Calibrator.from_dict(calibrator.to_dict())
    np.testing.assert_array_equal(again.probabilities(x), p)
    # A record written before the range existed reads as unbounded (the earlier behaviour).
    old = Calibrator.from_dict({"method": "platt", "a": 2.0, "b": 0.5, "decile_logit_thresholds": []})
    assert (old.low, old.high) == (-math.inf, math.inf)
    from fedchurn.shared.errors import FedChurnError

    with pytest.raises(FedChurnError, match="interval"):
        Calibrator(a=1.0, b=0.0, low=1.0, high=-1.0)


def test_platt_on_well_separated_counts_converges_to_the_maximum_likelihood_line() -> None:
    """These counts (a bank at ε = 3) sent the undamped Newton fit to a = 1e10; sklearn is the reference."""
    centres = SPEC.centres
    neg = np.array([1513.0, 114, 77, 58, 43, 19, 17, 8, 6, 19])
    pos = np.array([39.0, 34, 24, 23, 25, 26, 25, 36, 23, 132])
    a, b = fit_platt(centres, pos, neg)
    x = np.concatenate([centres, centres]).reshape(-1, 1)
    y = np.concatenate([np.ones(10), np.zeros(10)])
    reference = LogisticRegression(C=1e8, tol=1e-10, max_iter=10_000).fit(
        x, y, sample_weight=np.concatenate([pos, neg])
    )
    assert a == pytest.approx(float(reference.coef_[0, 0]), abs=1e-3)
    assert b == pytest.approx(float(reference.intercept_[0]), abs=1e-3)
    # With no noise, the histogram fit is the same fit.
    assert fit_platt_histogram(np.vstack([neg, pos]), centres) == pytest.approx((a, b))


def test_bins_holding_only_noise_are_left_out_of_the_fit() -> None:
    """Rows in three bins; the other seven hold noise of std 5 only. Adversarial: put large fake churner counts in
    the empty high bins (as noise may): they stay below 2 σ_e √2 and must not move the fit."""
    neg = np.array([400.0, 150.0, 40.0, 0, 0, 0, 0, 0, 0, 0])
    pos = np.array([20.0, 30.0, 25.0, 0, 0, 0, 0, 0, 0, 0])
    clean = fit_platt_histogram(np.vstack([neg, pos]), SPEC.centres, noise_multiplier=5.0)
    noisy_pos = pos + np.array([0, 0, 0, 12.0, 13.0, 12.0, 13.0, 12.0, 13.0, 12.0])  # each < 2·5·√2 ≈ 14.1
    noisy_neg = neg - np.array([0, 0, 0, 12.0, 13.0, 12.0, 13.0, 12.0, 13.0, 12.0]) * 0.5
    assert fit_platt_histogram(np.vstack([noisy_neg, noisy_pos]), SPEC.centres, noise_multiplier=5.0) == clean
    with pytest.raises(Exception, match="noise multiplier"):
        fit_platt_histogram(np.vstack([neg, pos]), SPEC.centres, noise_multiplier=-1.0)


def test_the_release_counts_each_customer_once_and_its_bins_read_no_row() -> None:
    """What the evaluation release adds (training rows): still L2 sensitivity 1 for the whole (6, B) array, so the
    one Gaussian step the bank already charges covers it; the bins' centre is a function of the model alone."""
    config = default_config()
    data = prepare_institution(config, institution_names(config.data, seed=config.seed)[0])
    model = build_model(config.model, input_dim=len(data.feature_names))
    full, offset = exact_histograms(model, data, SPEC)
    assert full.shape == (6, SPEC.bins)
    assert full.sum() == len(data.y_val) + len(data.y_test) + len(data.y_train)
    for field in ("train", "val", "test"):
        x, y = getattr(data, f"x_{field}"), getattr(data, f"y_{field}")
        fewer = dataclasses.replace(data, **{f"x_{field}": x[1:], f"y_{field}": y[1:]})
        reduced, same_offset = exact_histograms(model, fewer, SPEC)
        difference = full - reduced
        assert same_offset == offset
        assert np.count_nonzero(difference) == 1 and difference.sum() == 1.0  # one cell, by one
    assert set(inspect.signature(reference_logit).parameters) == {"model", "input_dim"}
