"""Server aggregation on fake replies, checked against hand-computed weighted averages."""

from __future__ import annotations

import math
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from server.strategy import DroppedReply, Reply, check_encoder_update, make_strategy
from shared.config import StrategyConfig
from shared.wire import TRAIN_METRICS, identity_record, to_array_record

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
    strategy = _strategy(recorder)
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
