"""Evaluation under the privacy guarantee: the DP histogram, what is derived from it, and what leaves a bank.

The mechanism is checked against hand computations and scikit-learn; the bank's behaviour through its real
ClientApp with real Flower messages, played by a server that asks for more than the bank's policy allows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from sklearn.metrics import average_precision_score, roc_auc_score

from fedchurn.clients.app import make_client_app
from fedchurn.clients.calibration import Calibrator, decile_thresholds, fit_platt, fit_platt_histogram
from fedchurn.clients.metrics import risk_deciles
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.private_evaluation import KEPT_MODEL_FILE, KEPT_RECORD_FILE
from fedchurn.clients.private_metrics import (
    BinSpec,
    histogram_auc,
    histogram_metrics,
    histogram_pr_auc,
    release_histogram,
    reliability_bins,
    score_histogram,
    secure_rng,
)
from fedchurn.clients.training import steps_per_round
from fedchurn.scoring import score_customers
from fedchurn.server.app import initial_encoder
from fedchurn.server.privacy_oversight import PrivacyOversight
from fedchurn.server.report import RunRecorder
from fedchurn.server.strategy import make_strategy
from fedchurn.shared.bank_random import bank_secret_key
from fedchurn.shared.config import (
    BudgetConfig,
    EvaluationConfig,
    FedChurnConfig,
    SyntheticConfig,
    config_to_run_config,
    default_config,
    dump_config,
)
from fedchurn.shared.decline import DECLINE_METRICS, EVALUATION_WITHHELD
from fedchurn.shared.errors import DataError, FedChurnError
from fedchurn.shared.institution_rows import resolve_schema, write_csv
from fedchurn.shared.ledger import InstitutionLedger
from fedchurn.shared.privacy_accounting import (
    AccountantState,
    MechanismStep,
    compute_epsilon,
    epsilon_of,
    sample_rate_for,
)
from fedchurn.shared.synthetic_consortium import generate_synthetic_institution
from fedchurn.shared.wire import evaluate_metrics, to_array_record

# --------------------------------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------------------------------


def test_released_noise_has_std_sigma_and_comes_from_a_fresh_secret_source() -> None:
    sigma = 4.0
    zeros = np.zeros((2, 10))
    draws = np.stack([release_histogram(zeros, noise_multiplier=sigma, rng=secure_rng()) for _ in range(2000)])
    # 40,000 normal samples: the sample std is within 2 % of σ with overwhelming probability (SE ≈ 0.35 %).
    assert np.std(draws) == pytest.approx(sigma, rel=0.02)
    assert abs(float(np.mean(draws))) < 0.1
    # Every cell independent: correlation between two cells across draws is ~0.
    assert abs(np.corrcoef(draws[:, 0, 0], draws[:, 1, 3])[0, 1]) < 0.1
    # Two releases of the same counts never repeat the noise (no configured seed can reproduce it).
    counts = np.arange(20, dtype=float).reshape(2, 10)
    a = release_histogram(counts, noise_multiplier=sigma, rng=secure_rng())
    b = release_histogram(counts, noise_multiplier=sigma, rng=secure_rng())
    assert not np.array_equal(a, b)


def test_adding_one_customer_changes_exactly_one_cell_by_one() -> None:
    rng = np.random.default_rng(0)
    spec = BinSpec(bins=10, logit_range=6.0)
    logits = rng.normal(-2.0, 3.0, size=300)
    labels = rng.integers(0, 2, size=300)
    before = score_histogram(logits, labels, spec)
    for new_logit, new_label in ((-100.0, 0), (0.01, 1), (5.99, 0), (6.0, 1), (1e9, 1)):
        after = score_histogram(np.append(logits, new_logit), np.append(labels, new_label), spec)
        difference = after - before
        assert np.count_nonzero(difference) == 1 and difference.sum() == 1.0
        assert np.linalg.norm(difference) == 1.0  # L2 sensitivity 1
        assert difference[new_label].sum() == 1.0


def test_histogram_auc_and_pr_auc_equal_sklearn_when_scores_fall_in_distinct_bins() -> None:
    rng = np.random.default_rng(1)
    spec = BinSpec(bins=400, logit_range=10.0)
    bins = rng.choice(400, size=120, replace=False)
    logits = spec.centres[bins]
    labels = (rng.random(120) < 1 / (1 + np.exp(-logits / 3))).astype(int)
    counts = score_histogram(logits, labels, spec)
    assert histogram_auc(counts) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    assert histogram_pr_auc(counts) == pytest.approx(average_precision_score(labels, logits), abs=1e-12)


def test_histogram_auc_counts_rows_of_one_bin_as_ties() -> None:
    # Hand count: bins 0 | 1 | 2 hold negatives 2 | 1 | 0 and positives 0 | 1 | 2.
    # U = 1 × (2 + 0.5 × 1) + 2 × (3 + 0) = 8.5, over 3 × 3 pairs.
    counts = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert histogram_auc(counts) == pytest.approx(8.5 / 9)
    assert math.isnan(histogram_auc(np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])))


def test_brier_and_ece_from_a_histogram_match_hand_values() -> None:
    counts = np.array([[8.0, 2.0], [2.0, 8.0]])  # bin 0: 2 of 10 churn; bin 1: 8 of 10
    probabilities = np.array([0.1, 0.9])
    m = histogram_metrics(counts, probabilities)
    # bin 0: 8 × 0.1² + 2 × 0.9² = 1.70; bin 1 the same; over 20 rows
    assert m["brier"] == pytest.approx(0.17)
    assert m["ece"] == pytest.approx(0.1)  # |0.2 − 0.1| and |0.8 − 0.9|, each half the rows
    assert m["mean_probability"] == pytest.approx(0.5) and m["churn_rate"] == pytest.approx(0.5)


def test_reliability_bins_match_hand_values_on_noisy_counts() -> None:
    # bin 0: 6 + 2 rows; bin 1: -1.5 + 0.5 (the noise left it empty); bin 2: 0.5 + 2 (churners above the rows
    # of a noisy cell pair are clipped: 2 / 2.5 = 0.8); bin 3: -0.2 + 1.2 = 1 row, all churners.
    counts = np.array([[6.0, -1.5, 0.5, -0.2], [2.0, 0.5, 2.0, 1.2]])
    probability, rate, rows = reliability_bins(counts, np.array([0.1, 0.3, 1.2, 0.9]))
    np.testing.assert_allclose(probability, [0.1, 0.3, 1.0, 0.9])  # a probability is clipped to [0, 1]
    np.testing.assert_allclose(rows, [8.0, 0.0, 2.5, 1.0])
    assert rate[0] == pytest.approx(0.25) and math.isnan(rate[1])
    assert rate[2] == pytest.approx(0.8) and rate[3] == pytest.approx(1.0)
    with pytest.raises(FedChurnError, match="probabilities for 4"):
        reliability_bins(counts, np.array([0.1, 0.2]))


def test_gaussian_release_composes_as_hand_computed_rdp_and_matches_dp_accounting() -> None:
    """T releases at σ: RDP α T / (2σ²) per order α; ε by Balle et al.'s conversion on Opacus' order grid."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    sigma, releases, delta = 4.0, 3, 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = orders * releases / (2 * sigma**2)
    by_hand = float(np.min(rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)))
    ours = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=releases, delta=delta)
    assert ours == pytest.approx(by_hand, rel=1e-9)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
    independent = accountant.get_epsilon(delta)
    assert ours == pytest.approx(independent, rel=0.03)
    # Appended to a training history, the release is one more entry: composition never forgets it.
    state = AccountantState(accountant="prv").with_steps(noise_multiplier=1.2, sample_rate=0.1, steps=50)
    both = state.with_steps(noise_multiplier=sigma, sample_rate=1.0, steps=1)
    assert epsilon_of(both, delta=delta) > epsilon_of(state, delta=delta)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def test_platt_fit_recovers_known_slope_and_intercept() -> None:
    rng = np.random.default_rng(2)
    a, b = 1.7, -1.2
    x = rng.normal(0.0, 2.0, size=200_000)
    y = (rng.random(x.shape[0]) < 1 / (1 + np.exp(-(a * x + b)))).astype(float)
    fitted_a, fitted_b = fit_platt(x, y, 1.0 - y)
    assert fitted_a == pytest.approx(a, abs=0.03) and fitted_b == pytest.approx(b, abs=0.03)
    # From a fine histogram of the same rows (bin centres stand for the logits): the same line, nearly.
    spec = BinSpec(bins=400, logit_range=10.0)
    ha, hb = fit_platt_histogram(score_histogram(x, y.astype(int), spec), spec.centres)
    assert ha == pytest.approx(a, abs=0.05) and hb == pytest.approx(b, abs=0.05)


def test_platt_fit_from_noisy_histogram_keeps_the_mean_near_the_churn_rate() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(-4.0, 1.5, size=3000)  # a model whose probabilities are far too low, as before calibration
    y = (rng.random(3000) < 1 / (1 + np.exp(-(x + 3.0)))).astype(int)
    spec = BinSpec(bins=10, logit_range=6.0)
    counts = score_histogram(x, y, spec)
    means = []
    for _ in range(20):
        a, b = fit_platt_histogram(release_histogram(counts, noise_multiplier=4.0, rng=secure_rng()), spec.centres)
        means.append(float(np.mean(Calibrator(a=a, b=b).probabilities(x))))
    assert abs(np.median(means) - y.mean()) < 0.2 * y.mean()


def test_decile_thresholds_split_the_histogram_into_tenths() -> None:
    spec = BinSpec(bins=10, logit_range=5.0)
    counts = np.vstack([np.zeros(10), np.full(10, 10.0)])  # 10 rows per bin of width 1: quantile k at −5 + k
    thresholds = decile_thresholds(counts, spec.edges)
    assert thresholds == pytest.approx([-5.0 + k for k in range(1, 10)])
    calibrator = Calibrator(a=1.0, b=0.0, thresholds=thresholds)
    assert calibrator.deciles(np.array([-4.5, -0.5, 0.5, 4.9, 100.0])).tolist() == [1, 5, 6, 10, 10]


# --------------------------------------------------------------------------------------------------
# The bank, through its real ClientApp
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _config(tmp_path: Path, *, rounds: int = 2, **evaluation) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500))
    return dataclasses.replace(
        base,
        output_dir=str(tmp_path / "run"),
        data=data,
        rounds=rounds,
        evaluation=dataclasses.replace(base.evaluation, **evaluation),
    )


def _context(config: FedChurnConfig, run_id: int = 21) -> Context:
    return Context(
        run_id=run_id,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )


def _send(app, context: Context, encoder: dict, message_type: str, server_round: int) -> Message:
    content = RecordDict({"arrays": to_array_record(encoder), "config": ConfigRecord({"server-round": server_round})})
    reply = app(Message(content=content, dst_node_id=context.node_id, message_type=message_type), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def _is_withheld(reply: Message) -> bool:
    content = reply.content
    return (
        set(content.metric_records) == {"metrics"}
        and set(content["metrics"]) == set(DECLINE_METRICS)
        and not content.array_records
        and content.config_records["status"].get("reason") == EVALUATION_WITHHELD
    )


def _evaluate_records(config: FedChurnConfig) -> list[dict]:
    ledger = InstitutionLedger.in_folder(Path(config.output_dir) / "institutions" / "bank-01")
    return [e.record for e in ledger.entries() if e.record.get("kind") == "evaluate"]


def test_evaluation_off_releases_nothing_about_validation_or_test_rows(tmp_path: Path) -> None:
    config = _config(tmp_path, mode="off", rounds=1)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    trained = _send(app, context, encoder, MessageType.TRAIN, 1).content["metrics"]
    reply = _send(app, context, encoder, MessageType.EVALUATE, 1)
    assert _is_withheld(reply)
    # The only numbers are the budget figures the training reply already told (ε, δ, rounds trained).
    assert reply.content["metrics"]["epsilon"] == pytest.approx(trained["epsilon"])
    assert _evaluate_records(config) == []
    folder = Path(config.output_dir) / "institutions" / "bank-01"
    assert not (folder / KEPT_MODEL_FILE).exists()


def test_no_release_once_it_would_exceed_the_budget(tmp_path: Path) -> None:
    probe = _config(tmp_path, rounds=1)
    # The bank's own split (its secret key, made here first and then used by the bank): its n sets q and the steps.
    key, _ = bank_secret_key(Path(probe.output_dir) / "institutions" / "bank-01")
    n = len(prepare_institution(probe, "bank-01", split_key=key).y_train)
    q = sample_rate_for(dataset_size=n, batch_size=probe.training.batch_size)
    steps = steps_per_round(n_train=n, batch_size=probe.training.batch_size, local_epochs=1)
    trained_only = compute_epsilon(
        noise_multiplier=probe.privacy.noise_multiplier, sample_rate=q, steps=steps, delta=1e-5
    )
    # The budget fits the training round but not the release after it.
    config = dataclasses.replace(probe, budget=BudgetConfig(max_epsilon=trained_only + 0.01))
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    reply = _send(app, context, encoder, MessageType.EVALUATE, 1)
    assert _is_withheld(reply)
    assert reply.content["metrics"]["projected-epsilon"] > config.budget.max_epsilon
    privacy = json.loads((Path(config.output_dir) / "institutions" / "bank-01" / "privacy.json").read_text())
    assert sum(s["steps"] for s in privacy["accountant_state"]["history"]) == steps, "nothing charged, nothing sent"
    assert _evaluate_records(config) == []


def test_a_server_asking_every_round_gets_at_most_one_release_per_trained_round(tmp_path: Path) -> None:
    config = _config(tmp_path, rounds=3, every_rounds=1)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    released = []
    for server_round in (1, 2):
        _send(app, context, encoder, MessageType.TRAIN, server_round)
        # The server asks again and again, claiming other rounds: one release per round the bank trained.
        for claimed in (server_round, server_round, 99, 0):
            reply = _send(app, context, encoder, MessageType.EVALUATE, claimed)
            released.append(not _is_withheld(reply))
            if released[-1]:
                assert set(reply.content["metrics"]) == set(evaluate_metrics(config.evaluation.bins))
    assert sum(released) == 2
    records = _evaluate_records(config)
    assert len(records) == 2
    assert all(r["noise_multiplier"] == 5.0 and r["sample_rate"] == 1.0 and r["steps"] == 1 for r in records)
    privacy = json.loads((Path(config.output_dir) / "institutions" / "bank-01" / "privacy.json").read_text())
    releases = [s for s in privacy["accountant_state"]["history"] if s["sample_rate"] == 1.0]
    assert sum(s["steps"] for s in releases) == 2, "every release is in the accountant's history"
    # The audit recomposes ε over training and evaluation records alike and finds the ledger complete.
    from fedchurn.auditing.run_audit import _audit_institution

    audit = _audit_institution(
        Path(config.output_dir) / "institutions" / "bank-01",
        21,
        [],
        None,
        consortium_key=None,
        consortium_fingerprint=None,
        config=None,
    )
    # No server ran here, so no record is countersigned: the audit says so (more than the newest round's training
    # record without one); everything else checks out.
    assert audit.findings == []
    assert len(audit.tampering) == 1 and "anchored by no countersignature" in audit.tampering[0]
    # Composing every ledger record (training and releases) by hand gives the bank's reported ε.
    ledger = InstitutionLedger.in_folder(Path(config.output_dir) / "institutions" / "bank-01")
    history = tuple(
        MechanismStep(noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"], steps=r["steps"])
        for r in (e.record for e in ledger.entries())
    )
    composed = epsilon_of(AccountantState(accountant="rdp", history=history), delta=1e-5)
    assert composed == pytest.approx(privacy["epsilon"], rel=1e-9)


def test_an_encoder_that_overflows_on_some_rows_still_gets_only_a_dp_release(tmp_path: Path) -> None:
    config = _config(tmp_path, rounds=1)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    # Finite weights (the bank's checks pass) so large that rows overflow to inf/NaN depending on their values.
    hostile = {k: (v * np.float32(1e37) if v.ndim == 2 else v) for k, v in encoder.items()}
    reply = _send(app, context, hostile, MessageType.EVALUATE, 1)  # no error reply whatever the rows hold
    assert not _is_withheld(reply) and set(reply.content["metrics"]) == set(evaluate_metrics(config.evaluation.bins))
    assert len(_evaluate_records(config)) == 1


def test_per_bin_figures_come_from_the_released_test_histogram_not_the_exact_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedchurn.clients.private_evaluation as private_evaluation

    seen: dict[str, np.ndarray] = {}

    def spy(counts: np.ndarray, **kwargs) -> np.ndarray:
        seen["exact"] = np.array(counts)
        seen["released"] = release_histogram(counts, **kwargs)
        return seen["released"]

    monkeypatch.setattr(private_evaluation, "release_histogram", spy)
    config = _config(tmp_path, rounds=1, bins=7)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    metrics = _send(app, context, encoder, MessageType.EVALUATE, 1).content["metrics"]
    assert set(metrics) == set(evaluate_metrics(7))
    test, exact = seen["released"][2:4], seen["exact"][2:4]  # validation, test, training: the test part
    for j in range(7):
        rows = test[0, j] + test[1, j]
        assert metrics[f"cal-rows-{j}"] == pytest.approx(max(0.0, rows), abs=1e-9)
        if rows > 0:
            assert metrics[f"cal-rate-{j}"] == pytest.approx(min(1.0, max(0.0, test[1, j] / rows)), abs=1e-9)
        else:
            assert math.isnan(metrics[f"cal-rate-{j}"])
        assert 0.0 <= metrics[f"cal-prob-{j}"] <= 1.0
    # σ_e = 5 per cell: the figures sent are the noisy ones, never the exact counts
    sent_rows = np.array([metrics[f"cal-rows-{j}"] for j in range(7)])
    assert not np.allclose(sent_rows, exact.sum(axis=0))


def test_default_releases_only_after_the_last_round_and_keeps_a_calibrated_model(tmp_path: Path) -> None:
    config = _config(tmp_path, rounds=2)  # default every_rounds = 0: the last round only
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    assert _is_withheld(_send(app, context, encoder, MessageType.EVALUATE, 1))
    _send(app, context, encoder, MessageType.TRAIN, 2)
    metrics = _send(app, context, encoder, MessageType.EVALUATE, 2).content["metrics"]
    assert metrics["kept-round"] == 2.0
    assert math.isnan(metrics["auc"]) or 0.0 <= metrics["auc"] <= 1.0  # NaN: noise left a class empty
    folder = Path(config.output_dir) / "institutions" / "bank-01"
    record = json.loads((folder / KEPT_RECORD_FILE).read_text())
    assert record["round"] == 2 and record["calibration"]["method"] == "platt"
    assert (folder / KEPT_MODEL_FILE).is_file()


def test_the_server_records_a_withheld_evaluation_instead_of_failing(tmp_path: Path) -> None:
    config = _config(tmp_path, mode="off", rounds=1)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    reply = _send(app, context, encoder, MessageType.EVALUATE, 1)
    out = Path(config.output_dir) / "server"
    recorder = RunRecorder(out, rounds=1)
    oversight = PrivacyOversight(config, out, run_id=21)
    strategy = oversight.wrap(make_strategy(config.strategy, observer=recorder, min_available=1))
    assert strategy.aggregate_evaluate(1, [reply]) is None
    assert oversight.withheld == {"bank-01": [1]}
    assert recorder.dropped == [] and recorder.latest == {}
    # Sent as a training reply, it is not a training decline: the bank does not count as stopped.
    strategy.aggregate_train(1, [reply])
    assert oversight.declines == [] and oversight.stopped == {}
    assert len(recorder.dropped) == 1 and "evaluate request" in recorder.dropped[0]["reason"]


# --------------------------------------------------------------------------------------------------
# predict: fixed deciles
# --------------------------------------------------------------------------------------------------


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_predict_gives_a_customer_the_same_decile_in_any_file(tmp_path: Path) -> None:
    config = _config(tmp_path, rounds=1)
    app, context = make_client_app(), _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    _send(app, context, encoder, MessageType.TRAIN, 1)
    _send(app, context, encoder, MessageType.EVALUATE, 1)
    run = Path(config.output_dir)
    (run / "config.yaml").write_text(dump_config(config), encoding="utf-8")

    table = generate_synthetic_institution(config.data.synthetic, 0, seed=config.seed + 1)
    write_csv(table, tmp_path / "all.csv")
    header, rows = _csv_rows(tmp_path / "all.csv")
    header = ["customer_id", *header]
    rows = [[f"c{i}", *row] for i, row in enumerate(rows)]
    # Two files: the first 60 customers alone, and customers 40.. with the rest (a very different mix).
    for name, subset in (("a.csv", rows[:60]), ("b.csv", rows[40:])):
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *subset])
    results = {}
    for name in ("a.csv", "b.csv"):
        result = score_customers(run, "bank-01", tmp_path / name, tmp_path / f"scored-{name}")
        assert result.calibrated and result.model_round == 1
        assert result.metrics is not None and 0.0 <= result.metrics["ece"] <= 1.0 and result.calibration
        _, scored = _csv_rows(tmp_path / f"scored-{name}")
        results[name] = {row[0]: (row[1], row[2]) for row in scored}
    shared = set(results["a.csv"]) & set(results["b.csv"])
    assert len(shared) == 20
    for customer in shared:
        assert results["a.csv"][customer] == results["b.csv"][customer]
    # The check can fail: deciles ranked within each file (the old behaviour) move shared customers.
    within = {}
    for name, scored in results.items():
        ids = list(scored)
        ranked = risk_deciles(np.array([float(scored[i][0]) for i in ids]))
        within[name] = dict(zip(ids, ranked.tolist(), strict=True))
    assert any(within["a.csv"][c] != within["b.csv"][c] for c in shared)
    # A later run in the same folder that kept nothing: the earlier run's kept model is not used.
    privacy_path = run / "institutions" / "bank-01" / "privacy.json"
    privacy = json.loads(privacy_path.read_text())
    privacy_path.write_text(json.dumps({**privacy, "run_id": "a-later-run"}))
    with pytest.raises(DataError, match="encoder not found"):  # falls back to the final model, absent here
        score_customers(run, "bank-01", tmp_path / "a.csv", tmp_path / "again.csv")


def test_evaluation_config_names_key_value_and_rule() -> None:
    from fedchurn.shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"evaluation\.noise_multiplier"):
        EvaluationConfig(noise_multiplier=0.0)
    with pytest.raises(ConfigError, match=r"evaluation\.every_rounds"):
        EvaluationConfig(every_rounds=-1)


def test_calibration_falls_back_when_the_validation_release_is_lost_in_noise() -> None:
    from fedchurn.clients.private_evaluation import calibrator_from_releases as _calibrator
    from fedchurn.clients.private_metrics import EvaluationSettings

    settings = EvaluationSettings(
        mode="dp", noise_multiplier=4.0, spec=BinSpec(bins=10, logit_range=6.0), every_rounds=0
    )
    strong = np.vstack([np.linspace(80, 10, 10), np.linspace(5, 40, 10)])  # both classes far above 4 × √10 ≈ 12.6
    weak = np.vstack([np.full(10, 3.0), np.full(10, 0.5)])  # 5 churners in all: indistinguishable from noise
    assert _calibrator(strong, strong, settings)[1] == "validation"
    assert _calibrator(weak, strong, settings)[1] == "validation+test"
    calibrator, source = _calibrator(weak, weak, settings)
    assert source == "none" and (calibrator.a, calibrator.b) == (1.0, 0.0)


def test_planned_releases_count_what_the_release_rule_allows() -> None:
    from fedchurn.clients.private_metrics import EvaluationSettings

    spec = BinSpec(bins=10, logit_range=6.0)

    def planned(mode: str, every: int, rounds: int) -> int:
        settings = EvaluationSettings(mode=mode, noise_multiplier=4.0, spec=spec, every_rounds=every)
        return settings.planned_releases(rounds)

    assert planned("dp", 0, 5) == 1  # the last round only
    assert planned("dp", 1, 5) == 5
    assert planned("dp", 2, 5) == 3  # after rounds 2, 4 and the last, 5
    assert planned("dp", 5, 5) == 1
    assert planned("off", 1, 5) == 0


def test_the_server_cannot_lower_evaluation_noise_or_turn_it_on_past_the_banks_policy() -> None:
    """The run's evaluation section is the server's ask; the bank's policy bounds it."""
    from fedchurn.clients.private_metrics import evaluation_settings
    from fedchurn.shared.config import apply_overrides, default_config
    from fedchurn.shared.policy import CONSERVATIVE_POLICY

    hostile = apply_overrides(default_config(), {"evaluation.noise_multiplier": 0.5, "evaluation.mode": "dp"})
    assert evaluation_settings(hostile, policy=CONSERVATIVE_POLICY).noise_multiplier == 5.0
    closed = dataclasses.replace(CONSERVATIVE_POLICY, evaluation="off")
    assert not evaluation_settings(hostile, policy=closed).enabled
