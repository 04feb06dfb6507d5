"""Server aggregation on fake replies, checked against hand-computed weighted averages."""

from __future__ import annotations

import math
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedchurn.server.strategy import DroppedReply, Reply, check_encoder_update, make_strategy
from fedchurn.shared.config import StrategyConfig
from fedchurn.shared.wire import TRAIN_METRICS, identity_record, to_array_record

KEYS = ("encoder.layers.0.weight", "encoder.layers.0.bias")


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps messages with the running task's identity; tests build messages outside a run.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {KEYS[0]: np.full((2, 3), value, dtype=np.float32), KEYS[1]: np.full((2,), value, dtype=np.float32)}


def _metrics(n: float, **extra: float) -> dict[str, float]:
    values = dict.fromkeys(TRAIN_METRICS, 0.0)
    values["num-examples"] = n
    values.update(extra)
    return values


def _reply(institution: str | None, arrays: dict[str, np.ndarray], metrics: dict[str, float], node: int = 7) -> Message:
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)})
    if institution is not None:
        content["identity"] = identity_record(institution)
    return Message(content=content, reply_to=_instruction(node))


def _instruction(node: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


class Recorder:
    def __init__(self) -> None:
        self.accepted: list[Reply] = []
        self.dropped: list[DroppedReply] = []

    def on_train(self, server_round, accepted, dropped) -> None:
        self.accepted, self.dropped = accepted, dropped

    def on_evaluate(self, server_round, accepted, dropped) -> None:  # pragma: no cover - not used here
        pass


def _strategy(recorder: Recorder, **overrides) -> object:
    strategy = make_strategy(StrategyConfig(**overrides), observer=recorder, min_available=1)
    # The round starts as in a run: configure_train sends the global encoder (all zeros) to two nodes.
    list(strategy.configure_train(1, to_array_record(_arrays(0.0)), ConfigRecord({}), _grid()))
    return strategy


def _grid() -> MagicMock:
    grid = MagicMock()
    grid.get_node_ids.return_value = [1, 2]
    return grid


def test_weighted_average_of_valid_replies_and_each_bad_reply_dropped_with_reason() -> None:
    recorder = Recorder()
    strategy = _strategy(recorder, bound_multiplier=None)  # the plain weighted mean, no relative bounds
    bad_shape = _arrays(1.0)
    bad_shape[KEYS[1]] = np.zeros((3,), dtype=np.float32)
    nan = _arrays(1.0)
    nan[KEYS[0]][0, 0] = np.nan
    wrong_keys = {KEYS[0]: _arrays(1.0)[KEYS[0]], "head.layers.0.weight": np.zeros((1, 2), dtype=np.float32)}
    replies = [
        _reply("bank-b", _arrays(5.0), _metrics(300)),
        _reply("bank-a", _arrays(1.0), _metrics(100)),
        _reply("bank-c", bad_shape, _metrics(100)),
        _reply("bank-d", nan, _metrics(100)),
        _reply("bank-e", wrong_keys, _metrics(100)),
        _reply(None, _arrays(1.0), _metrics(100), node=99),
        _reply("bank-f", _arrays(1.0), {**_metrics(100), "head-norm": 3.0}),
        _reply("bank-g", _arrays(1.0), _metrics(0)),
        Message(Error(code=0, reason="disk full"), reply_to=_instruction(11)),
        _reply("bank-a", _arrays(9.0), _metrics(100)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Hand-computed: (100 * 1 + 300 * 5) / 400 = 4.0
    result = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(result[KEYS[0]], np.full((2, 3), 4.0))
    np.testing.assert_allclose(result[KEYS[1]], np.full((2,), 4.0))
    assert [r.institution for r in recorder.accepted] == ["bank-a", "bank-b"]
    reasons = {d.institution: d.reason for d in recorder.dropped}
    assert "shape (3,)" in reasons["bank-c"]
    assert "non-finite" in reasons["bank-d"]
    assert "unexpected ['head.layers.0.weight']" in reasons["bank-e"]
    assert "naming the institution" in reasons["node 99"]
    assert "outside the whitelist: ['head-norm']" in reasons["bank-f"]
    assert "positive number" in reasons["bank-g"]
    assert "disk full" in reasons["node 11"]
    assert len(recorder.dropped) == 9 - 2 + 1  # seven bad replies, the error, and bank-a's second reply
    assert any("second reply" in d.reason for d in recorder.dropped)


def test_aggregation_does_not_depend_on_reply_order() -> None:
    rng = np.random.default_rng(0)
    replies = [
        _reply(
            f"bank-{i}",
            {k: rng.normal(size=v.shape).astype(np.float32) for k, v in _arrays(0).items()},
            _metrics(float(rng.integers(50, 500))),
        )
        for i in range(8)
    ]
    first, _ = _strategy(Recorder()).aggregate_train(1, replies)
    second, _ = _strategy(Recorder()).aggregate_train(1, list(reversed(replies)))
    assert not np.allclose(first[KEYS[0]].numpy(), 0.0)
    for key in KEYS:
        assert first[key].numpy().tobytes() == second[key].numpy().tobytes()


def test_too_few_valid_replies_keep_the_encoder() -> None:
    strategy = _strategy(Recorder(), min_replies=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply("bank-a", _arrays(1.0), _metrics(10))])
    assert arrays is None and metrics is None


def test_update_norm_bound() -> None:
    reference = _arrays(0.0)
    moved = _arrays(1.0)  # 6 + 2 ones: norm sqrt(8)
    assert check_encoder_update(moved, reference, max_update_norm=3.0) is None
    reason = check_encoder_update(moved, reference, max_update_norm=2.0)
    assert reason is not None and f"{math.sqrt(8):.4g}" in reason
    strategy = _strategy(Recorder(), max_update_norm=2.0)
    arrays, _ = strategy.aggregate_train(1, [_reply("bank-a", moved, _metrics(10))])
    assert arrays is None


def test_integer_arrays_refused() -> None:
    reference = _arrays(0.0)
    ints = {k: v.astype(np.int64) for k, v in reference.items()}
    assert "dtype int64" in check_encoder_update(ints, reference, max_update_norm=None)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_each_strategy_aggregates_the_encoder(name: str) -> None:
    recorder = Recorder()
    strategy = _strategy(recorder, name=name)
    arrays, _ = strategy.aggregate_train(1, [_reply("bank-a", _arrays(1.0), _metrics(10))])
    values = arrays[KEYS[0]].numpy()
    if name == "fedadam":
        # Server Adam moves from 0 towards the update by about eta per step, not all the way to 1.
        assert np.all(values > 0) and np.all(values < 0.5)
    else:
        np.testing.assert_allclose(values, 1.0)


def test_fedprox_sends_proximal_mu() -> None:
    strategy = make_strategy(StrategyConfig(name="fedprox", proximal_mu=0.5), observer=None, min_available=1)
    messages = list(strategy.configure_train(1, to_array_record(_arrays(0.0)), ConfigRecord({}), _grid()))
    assert messages and all(m.content["config"]["proximal-mu"] == 0.5 for m in messages)


def _honest(n: int = 3) -> list[Message]:
    # Honest banks move every parameter by 0.9, 1.0, 1.1, ...: update norms about sqrt(8) each.
    return [_reply(f"bank-{i}", _arrays(0.9 + 0.1 * i), _metrics(1.0)) for i in range(n)]


def _mean_value(arrays) -> np.ndarray:
    return np.concatenate([arrays[key].numpy().ravel() for key in KEYS])


def test_defaults_bound_norms_and_weights() -> None:
    config = StrategyConfig()
    assert config.max_update_norm == 1000.0 and config.bound_multiplier == 3.0 and config.max_examples == 1.0e6
    assert config.aggregation == "mean"


def test_one_1e30_update_is_dropped_and_the_encoder_stays_honest() -> None:
    recorder = Recorder()
    strategy = _strategy(recorder)
    arrays, _ = strategy.aggregate_train(1, [*_honest(), _reply("mallory", _arrays(1e30), _metrics(1.0))])
    values = _mean_value(arrays)
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values, 1.0, rtol=1e-6)  # (0.9 + 1.0 + 1.1) / 3, hand-computed
    assert [d.institution for d in recorder.dropped] == ["mallory"]
    assert "exceeds strategy.max_update_norm" in recorder.dropped[0].reason


def test_two_1e308_weights_cannot_overflow_or_dominate() -> None:
    recorder = Recorder()
    strategy = _strategy(recorder)
    poison = [_reply(f"mallory-{i}", _arrays(50.0), _metrics(1e308)) for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, [*_honest(), *poison])
    values = _mean_value(arrays)
    assert np.all(np.isfinite(values)) and np.all(values != 0.0)
    # Hand-computed: each poisoned weight 1e308 is capped at 1e6, then at 3 x the median of the others' weights
    # (1, 1, 1, 1e6 -> 1) = 3; each poisoned update (50 per parameter) is scaled to 3 x the median of the others'
    # per-parameter moves (0.9, 1.0, 1.1, 50 -> 1.05) = 3.15 per parameter.
    # (0.9 + 1.0 + 1.1 + 3 * 3.15 + 3 * 3.15) / (3 + 6) = 21.9 / 9
    np.testing.assert_allclose(values, 21.9 / 9.0, rtol=1e-5)
    assert {r.institution: r.weight for r in recorder.accepted}["mallory-0"] == 3.0
    assert {r.institution: r.metrics["num-examples"] for r in recorder.accepted}["mallory-0"] == 1e308


def test_median_aggregation_ignores_a_minority_of_poisoned_updates() -> None:
    strategy = _strategy(Recorder(), aggregation="median")
    poison = [_reply(f"mallory-{i}", _arrays(50.0), _metrics(1e308)) for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, [*_honest(), *poison])
    # Coordinate-wise median of 0.9, 1.0, 1.1, 3.15, 3.15 (the poisoned ones scaled to the norm bound) = 1.1
    np.testing.assert_allclose(_mean_value(arrays), 1.1, rtol=1e-6)


def test_trimmed_mean_aggregation() -> None:
    strategy = _strategy(Recorder(), aggregation="trimmed_mean", trim_fraction=0.2, bound_multiplier=None)
    replies = [_reply(f"bank-{i}", _arrays(v), _metrics(1.0)) for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(_mean_value(arrays), 3.0, rtol=1e-6)  # (2 + 3 + 4) / 3 after cutting 1 and 100


def test_robust_aggregation_needs_fedavg() -> None:
    from fedchurn.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.aggregation"):
        StrategyConfig(name="fedadam", aggregation="median")


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"epsilon": [1.0, 2.0]}, "must be one number, got list"),
        ({"epsilon": float("nan")}, "must be finite"),
        ({"noise-multiplier": float("inf")}, "must be finite"),
        ({"num-examples": float("inf")}, "must be finite"),
        ({"num-examples": -3.0}, "positive number"),
    ],
)
def test_malformed_metrics_are_dropped_never_raise(metrics: dict, expected: str) -> None:
    recorder = Recorder()
    strategy = _strategy(recorder)
    values = {**_metrics(1.0), **metrics}
    arrays, _ = strategy.aggregate_train(1, [*_honest(2), _reply("mallory", _arrays(1.0), values)])
    assert arrays is not None
    assert [d.institution for d in recorder.dropped] == ["mallory"] and expected in recorder.dropped[0].reason


def test_evaluate_with_a_list_valued_metric_does_not_raise() -> None:
    from fedchurn.shared.wire import EVALUATE_METRICS

    recorder = Recorder()
    strategy = _strategy(recorder)
    evaluated: dict[str, list] = {}
    recorder.on_evaluate = lambda r, accepted, dropped: evaluated.update(accepted=accepted, dropped=dropped)
    good = dict.fromkeys(EVALUATE_METRICS, 0.5)
    bad = {**good, "auc": [0.1, 0.9]}
    replies = [
        Message(
            RecordDict({"metrics": MetricRecord(good), "identity": identity_record("bank-a")}), reply_to=_instruction(1)
        ),
        Message(
            RecordDict({"metrics": MetricRecord(bad), "identity": identity_record("bank-b")}), reply_to=_instruction(2)
        ),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["auc"] == 0.5
    assert [d.institution for d in evaluated["dropped"]] == ["bank-b"]


def test_evaluate_accepts_an_undefined_noisy_figure_but_no_other_nan() -> None:
    from fedchurn.shared.wire import EVALUATE_METRICS

    recorder = Recorder()
    strategy = _strategy(recorder)
    evaluated: dict[str, list] = {}
    recorder.on_evaluate = lambda r, accepted, dropped: evaluated.update(accepted=accepted, dropped=dropped)
    good = dict.fromkeys(EVALUATE_METRICS, 0.5)
    undefined = {**good, "auc": float("nan")}  # the noise left a class empty at this bank: AUC undefined
    hostile = {**good, "epsilon": float("nan")}  # never legitimately NaN
    replies = [
        Message(RecordDict({"metrics": MetricRecord(m), "identity": identity_record(name)}), reply_to=_instruction(i))
        for i, (name, m) in enumerate((("bank-a", good), ("bank-b", undefined), ("bank-c", hostile)), start=1)
    ]
    strategy.aggregate_evaluate(1, replies)
    assert sorted(r.institution for r in evaluated["accepted"]) == ["bank-a", "bank-b"]
    assert [d.institution for d in evaluated["dropped"]] == ["bank-c"] and "epsilon" in evaluated["dropped"][0].reason


def test_extra_records_and_ledger_shape() -> None:
    recorder = Recorder()
    strategy = _strategy(recorder)
    extra = _reply("bank-x", _arrays(1.0), _metrics(1.0))
    extra.content["debug"] = ConfigRecord({"path": "/secret"})
    ledger_ok = _reply("bank-y", _arrays(1.0), _metrics(1.0))
    ledger_ok.content["ledger"] = ConfigRecord({"record-hash": "ab" * 32, "signature": "s", "public-key": "k"})
    ledger_long = _reply("bank-z", _arrays(1.0), _metrics(1.0))
    ledger_long.content["ledger"] = ConfigRecord({"signature": "x" * 5000})
    ledger_num = _reply("bank-w", _arrays(1.0), _metrics(1.0))
    ledger_num.content["ledger"] = ConfigRecord({"signature": 3})
    strategy.aggregate_train(1, [*_honest(2), extra, ledger_ok, ledger_long, ledger_num])
    reasons = {d.institution: d.reason for d in recorder.dropped}
    assert set(reasons) == {"bank-x", "bank-w", "bank-z"}
    assert "unexpected config records ['debug']" in reasons["bank-x"]
    assert "at most 4096" in reasons["bank-z"] and "at most 4096" in reasons["bank-w"]


def test_registered_node_cannot_speak_for_another_institution() -> None:
    recorder = Recorder()
    strategy = make_strategy(
        StrategyConfig(), observer=recorder, min_available=1, members={1: "bank-01", 2: "bank-02", 3: "bank-03"}
    )
    list(strategy.configure_train(1, to_array_record(_arrays(0.0)), ConfigRecord({}), _grid()))
    genuine = _reply("bank-01", _arrays(1.0), _metrics(1.0), node=1)
    impostor = _reply("bank-01", _arrays(9.0), _metrics(1.0), node=3)  # registered as bank-03
    stranger = _reply("bank-09", _arrays(9.0), _metrics(1.0), node=42)
    honest = _reply("bank-02", _arrays(1.0), _metrics(1.0), node=2)
    arrays, _ = strategy.aggregate_train(1, [impostor, stranger, genuine, honest])
    np.testing.assert_allclose(_mean_value(arrays), 1.0)
    assert [r.institution for r in recorder.accepted] == ["bank-01", "bank-02"]
    reasons = [d.reason for d in recorder.dropped]
    assert any("registered as 'bank-03'" in r and "impersonation" in r for r in reasons)
    assert any("node 42 is not in the member registry" in r for r in reasons)


def test_too_few_nodes_online_is_a_clear_error_after_the_round_timeout() -> None:
    import time

    from fedchurn.server.strategy import TooFewNodesError

    strategy = make_strategy(StrategyConfig(min_replies=3, round_timeout_s=0.3), observer=Recorder(), min_available=1)
    started = time.monotonic()
    with pytest.raises(TooFewNodesError, match="2 institution\\(s\\) online after 0.3 s"):
        list(strategy.configure_train(1, to_array_record(_arrays(0.0)), ConfigRecord({}), _grid()))
    assert 0.25 < time.monotonic() - started < 5.0


def test_rounds_without_any_answer_stop_the_run() -> None:
    from fedchurn.server.resume import NoRepliesError, ResumableRounds

    inner = _strategy(Recorder())
    rounds = ResumableRounds(inner, round_offset=0, round_timeout_s=1.0, observer=Recorder())
    dead = [Message(Error(code=0, reason="ray worker died"), reply_to=_instruction(1))]
    rounds.aggregate_train(1, dead)  # one silent round: the run goes on
    rounds.aggregate_train(2, _honest(2))  # an answer resets the count
    rounds.aggregate_train(3, dead)
    with pytest.raises(NoRepliesError, match="rounds 3-4: no institution answered"):
        rounds.aggregate_train(4, [])


def _evaluate_reply(name: str, metrics: dict, node: int) -> Message:
    return Message(
        RecordDict({"metrics": MetricRecord(metrics), "identity": identity_record(name)}), reply_to=_instruction(node)
    )


def _with_bins(bins: int = 10) -> dict[str, float]:
    from fedchurn.shared.wire import EVALUATE_METRICS

    values = dict.fromkeys(EVALUATE_METRICS, 0.5)
    for j in range(bins):
        values |= {f"cal-prob-{j}": (j + 0.5) / bins, f"cal-rate-{j}": 0.2, f"cal-rows-{j}": 40.0 + j}
    return values


def _evaluate(replies: list[Message]) -> tuple[dict, MetricRecord | None]:
    recorder = Recorder()
    strategy = _strategy(recorder)
    evaluated: dict[str, list] = {}
    recorder.on_evaluate = lambda r, accepted, dropped: evaluated.update(accepted=accepted, dropped=dropped)
    pooled = strategy.aggregate_evaluate(1, replies)
    return evaluated, pooled


def test_per_bin_calibration_figures_are_kept_per_bank_and_never_pooled() -> None:
    from fedchurn.shared.wire import EVALUATE_METRICS, calibration_metrics

    empty_bin = {**_with_bins(4), "cal-rate-2": float("nan"), "cal-rows-2": 0.0}  # the noise left bin 2 empty
    evaluated, pooled = _evaluate(
        [
            _evaluate_reply("bank-a", _with_bins(10), 1),
            _evaluate_reply("bank-b", empty_bin, 2),
            _evaluate_reply("bank-c", dict.fromkeys(EVALUATE_METRICS, 0.5), 3),  # none sent: no diagram, accepted
        ]
    )
    assert evaluated["dropped"] == []
    accepted = {r.institution: r.metrics for r in evaluated["accepted"]}
    assert accepted["bank-a"]["cal-rows-9"] == 49.0 and set(calibration_metrics(10)) <= set(accepted["bank-a"])
    assert math.isnan(accepted["bank-b"]["cal-rate-2"])
    assert pooled is not None and pooled["auc"] == 0.5
    assert not any(key.startswith("cal-") for key in pooled), "one bank's bins are not averaged with another's"


def _without(values: dict, *keys: str) -> dict:
    return {k: v for k, v in values.items() if k not in keys}


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({**_with_bins(), "cal-prob-3": 1.5}, "'cal-prob-3' must be in [0, 1]"),
        ({**_with_bins(), "cal-prob-3": float("nan")}, "'cal-prob-3' must be in [0, 1]"),
        ({**_with_bins(), "cal-rate-0": -0.1}, "'cal-rate-0' must be in [0, 1]"),
        ({**_with_bins(), "cal-rate-0": float("inf")}, "'cal-rate-0' must be in [0, 1]"),
        ({**_with_bins(), "cal-rows-5": -1.0}, "'cal-rows-5' must be in [0, 1e+09]"),
        ({**_with_bins(), "cal-rows-5": 1e12}, "'cal-rows-5' must be in [0, 1e+09]"),
        ({**_with_bins(), "cal-rows-5": float("nan")}, "'cal-rows-5' must be in [0, 1e+09]"),
        ({**_with_bins(), "cal-rows-5": [1.0, 2.0]}, "'cal-rows-5' must be one number"),
        (_without(_with_bins(), "cal-rate-4"), "for every j from 0 to B-1"),  # a gap
        (_without(_with_bins(), *(f"cal-rows-{j}" for j in range(10))), "for every j from 0 to B-1"),  # a family
        ({**_with_bins(), "cal-prob-10": 0.5}, "for every j from 0 to B-1"),  # one family longer
        (_with_bins(1), "2 <= B <= 1000"),
        (_with_bins(1001), "more than the whitelist allows"),
        ({**_with_bins(), "cal-prob-01": 0.5}, "outside the whitelist: ['cal-prob-01']"),  # not a canonical index
        ({**_with_bins(), "cal-bins-0": 0.5}, "outside the whitelist: ['cal-bins-0']"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_hostile_per_bin_figures_are_refused_never_raise(metrics: dict, expected: str) -> None:
    evaluated, pooled = _evaluate([_evaluate_reply("bank-a", _with_bins(), 1), _evaluate_reply("mallory", metrics, 2)])
    assert [r.institution for r in evaluated["accepted"]] == ["bank-a"]
    assert [d.institution for d in evaluated["dropped"]] == ["mallory"], evaluated["dropped"]
    assert expected in evaluated["dropped"][0].reason, evaluated["dropped"][0].reason
    assert pooled is not None and pooled["auc"] == 0.5


@pytest.mark.parametrize(("family", "count"), [("cal-prob", 10**6), ("x", 10**4)])
def test_a_flood_of_metric_keys_is_refused(family: str, count: int) -> None:
    flood = {**_with_bins(), **{f"{family}-{j}": 0.5 for j in range(count)}}  # well-formed per-bin keys, or junk
    evaluated, _ = _evaluate([_evaluate_reply("bank-a", _with_bins(), 1), _evaluate_reply("mallory", flood, 2)])
    assert [d.institution for d in evaluated["dropped"]] == ["mallory"]
    assert "more than the whitelist allows" in evaluated["dropped"][0].reason


def test_a_train_reply_carries_no_per_bin_figures() -> None:
    recorder = Recorder()
    strategy = _strategy(recorder)
    hostile = _reply("mallory", _arrays(1.0), {**_metrics(1.0), "cal-prob-0": 0.5, "cal-prob-1": 0.5})
    strategy.aggregate_train(1, [*_honest(2), hostile])
    assert [d.institution for d in recorder.dropped] == ["mallory"] and "outside the whitelist" in recorder.dropped[
        0
    ].reason


def test_the_per_bin_whitelist_covers_every_bin_count_the_config_allows() -> None:
    from fedchurn.shared.config_schema import EvaluationConfig
    from fedchurn.shared.errors import ConfigError
    from fedchurn.shared.wire import MAX_CALIBRATION_BINS

    EvaluationConfig(bins=MAX_CALIBRATION_BINS)
    with pytest.raises(ConfigError, match="evaluation.bins"):
        EvaluationConfig(bins=MAX_CALIBRATION_BINS + 1)
