"""The warm-up before round 1: the bank prepares its rows and answers with nothing; the server reads nothing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fedchurn.clients.institution as institution_module
from fedchurn.clients.app import make_client_app
from fedchurn.server.app import initial_encoder
from fedchurn.server.warmup import WARM_UP_GROUP, warm_up_nodes
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, config_to_run_config, default_config
from fedchurn.shared.errors import DataError
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.wire import to_array_record


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(autouse=True)
def _empty_worker_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh worker: nothing prepared yet."""
    monkeypatch.setattr(institution_module, "_DATA_CACHE", type(institution_module._DATA_CACHE)())
    monkeypatch.setattr(institution_module, "_data_cache_used", 0)


def _config(tmp_path: Path) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=400))
    return dataclasses.replace(base, output_dir=str(tmp_path / "run"), data=data, rounds=2)


def _context(config: FedChurnConfig, partition: int) -> Context:
    return Context(
        run_id=5,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )


def _query(context: Context) -> Message:
    message = Message(content=RecordDict(), dst_node_id=context.node_id, message_type=MessageType.QUERY)
    return make_client_app()(message, context)


def _count_preparations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = institution_module.prepare_institution

    def counting(config, name, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(name)
        return real(config, name, **kwargs)

    monkeypatch.setattr(institution_module, "prepare_institution", counting)
    return calls


def test_warm_up_prepares_the_rows_so_round_one_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    calls = _count_preparations(monkeypatch)
    context = _context(config, 1)
    reply = _query(context)
    assert not reply.has_error()
    assert len(reply.content) == 0  # an acknowledgement only: no name, no metric, no array
    assert calls == ["bank-02"]  # its own rows, split with its own secret key (now in its state folder)
    assert (Path(config.output_dir) / "institutions" / "bank-02" / "bank_secret.key").exists()

    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    content = RecordDict({"arrays": to_array_record(encoder), "config": ConfigRecord({"server-round": 1})})
    train = Message(content=content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    answer = make_client_app()(train, context)
    assert not answer.has_error() and "arrays" in answer.content
    assert calls == ["bank-02"]  # round 1 found the rows prepared


def test_a_failing_warm_up_releases_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile server probing with warm-ups learns nothing from a failure: not its text, not even a code."""
    config = _config(tmp_path)

    def leaking(institution):  # type: ignore[no-untyped-def]
        raise DataError("customer 4711 has balance 98,765.43 in /secret/customers.csv line 12")

    monkeypatch.setattr("fedchurn.clients.warmup.load_data", leaking)
    reply = _query(_context(config, 0))
    assert not reply.has_error() and len(reply.content) == 0

    wrong_node = _context(config, 0)
    wrong_node.node_config = {"partition-id": 7, "num-partitions": 2}  # names no institution of this data
    reply = _query(wrong_node)
    assert not reply.has_error() and len(reply.content) == 0


class _Grid:
    """A grid whose nodes come online late and whose replies are hostile."""

    def __init__(self, online: list[list[int]], replies: list[Message]) -> None:
        self._online = online
        self._replies = replies
        self.sent: list[Message] = []
        self.timeout: float | None = None

    def get_node_ids(self) -> list[int]:
        return self._online.pop(0) if len(self._online) > 1 else self._online[0]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        self.sent = list(messages)
        self.timeout = timeout
        return iter(self._replies)


def _hostile_replies() -> list[Message]:
    big = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"institution": "someone-else", "x": 1e308})})
    return [
        Message(content=big, dst_node_id=0, message_type=MessageType.QUERY),
        Message(content=RecordDict({"config": ConfigRecord({"epsilon": -1.0})}), dst_node_id=0, message_type="train"),
    ]


def test_server_warms_every_node_once_and_reads_no_reply() -> None:
    grid = _Grid(online=[[], [3], [3, 1, 2]], replies=_hostile_replies())
    answered = warm_up_nodes(grid, expected=3, timeout=5.0)  # type: ignore[arg-type]
    assert answered == 2  # counted, never read
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3]
    for message in grid.sent:
        assert message.metadata.message_type == MessageType.QUERY
        assert message.metadata.group_id == WARM_UP_GROUP
        assert len(message.content) == 0  # the server asks nothing and sends nothing
    assert grid.timeout is not None and grid.timeout <= 5.0


def test_server_warm_up_waits_for_missing_nodes_only_until_its_timeout() -> None:
    grid = _Grid(online=[[4]], replies=[])
    started = time.monotonic()
    answered = warm_up_nodes(grid, expected=3, timeout=0.3)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert answered == 0
    assert 0.3 <= waited < 2.0
    assert [m.metadata.dst_node_id for m in grid.sent] == [4]  # the nodes online are still warmed
    assert grid.timeout is not None and grid.timeout <= 0.05
