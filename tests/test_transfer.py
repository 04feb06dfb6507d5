"""Transfer modes: what learns, what travels, what the server accepts, and ε across fedrep's two phases."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from fedchurn.clients.app import make_client_app
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.training import train_locally
from fedchurn.clients.transfer import train_round_phases
from fedchurn.comparison.baselines import fresh_model
from fedchurn.server.strategy import make_strategy
from fedchurn.shared import model as model_module
from fedchurn.shared import transfer
from fedchurn.shared.config import FedChurnConfig, StrategyConfig, SyntheticConfig, config_to_run_config, default_config
from fedchurn.shared.errors import CheckpointError, ConfigError
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.privacy_accounting import AccountantState, compute_epsilon, sample_rate_for
from fedchurn.shared.sharing import initial_shared_arrays, load_shared_arrays, outgoing_arrays, split_shared
from fedchurn.shared.wire import TRAIN_METRICS, from_array_record, identity_record, to_array_record


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _config(tmp_path: Path, mode: str = "finetune", **transfer_values) -> FedChurnConfig:
    base = default_config()
    return dataclasses.replace(
        base,
        output_dir=str(tmp_path / "run"),
        rounds=2,
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500)),
        transfer=dataclasses.replace(base.transfer, mode=mode, **transfer_values),
    )


# --- the rules ------------------------------------------------------------------------------------


def test_prefixes_match_the_model_and_each_mode_shares_what_it_says() -> None:
    assert transfer.ENCODER_PREFIX == model_module.ENCODER_PREFIX
    assert transfer.HEAD_PREFIX == model_module.HEAD_PREFIX
    assert transfer.shared_prefixes("finetune") == ("encoder.",)
    assert transfer.shared_prefixes("fedrep") == ("encoder.",)
    assert transfer.shared_prefixes("fedavg") == ("encoder.", "head.")
    assert transfer.shared_prefixes("frozen") == ()
    assert transfer.outside_mode(["encoder.a", "head.b", "x"], "finetune") == ["head.b", "x"]
    assert transfer.outside_mode(["encoder.a", "head.b"], "fedavg") == []


def test_phases_and_epochs_per_round(tmp_path: Path) -> None:
    fedrep = _config(tmp_path, "fedrep", head_epochs=2)
    assert transfer.round_phases(fedrep.transfer, local_epochs=3) == (
        transfer.Phase("head", 2),
        transfer.Phase("encoder", 3),
    )
    assert transfer.epochs_per_round(fedrep) == 2 + 1
    assert transfer.epochs_per_round(_config(tmp_path, "frozen")) == 1
    assert transfer.round_phases(_config(tmp_path, "fedavg").transfer, local_epochs=1) == (transfer.Phase("all", 1),)


def test_reference_modes_are_refused_as_a_federation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transfer.mode"):
        transfer.require_federated(_config(tmp_path, "local"))
    transfer.require_federated(_config(tmp_path, "fedrep"))


# --- training phases and DP accounting -----------------------------------------------------------


def test_parts_train_only_what_they_name(tmp_path: Path) -> None:
    config = _config(tmp_path)
    data = prepare_institution(config, "bank-02")
    model = fresh_model(config, input_dim=len(data.feature_names))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for parts, moved, fixed in (("head", "head.", "encoder."), ("encoder", "encoder.", "head.")):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        train_locally(
            model,
            data.x_train,
            data.y_train,
            training=config.training,
            privacy=config.privacy,
            accountant=AccountantState(accountant="rdp"),
            noise_multiplier=1.2,
            seed=3,
            parts=parts,
        )
        after = model.state_dict()
        assert all(torch.equal(start[k], after[k]) for k in after if k.startswith(fixed)), parts
        assert any(not torch.equal(start[k], after[k]) for k in after if k.startswith(moved)), parts
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fedrep_phases_compose_in_one_privacy_history(tmp_path: Path) -> None:
    config = _config(tmp_path, "fedrep", head_epochs=2)
    data = prepare_institution(config, "bank-02")
    model = fresh_model(config, input_dim=len(data.feature_names))
    n = len(data.y_train)
    report = train_round_phases(
        model,
        data.x_train,
        data.y_train,
        config=config,
        accountant=AccountantState(accountant="rdp"),
        noise_multiplier=1.2,
        proximal_mu=0.0,
        seed=5,
    )
    batches = math.ceil(n / config.training.batch_size)
    assert report.steps == 3 * batches  # 2 head epochs + 1 encoder epoch
    assert report.accountant.total_steps == 3 * batches
    q = sample_rate_for(dataset_size=n, batch_size=config.training.batch_size)
    expected = compute_epsilon(noise_multiplier=1.2, sample_rate=q, steps=3 * batches, delta=1e-5)
    assert report.epsilon == pytest.approx(expected, rel=1e-9)
    one_phase = compute_epsilon(noise_multiplier=1.2, sample_rate=q, steps=batches, delta=1e-5)
    assert report.epsilon > one_phase  # composed, not the last phase alone


# --- what travels -----------------------------------------------------------------------------------


def test_outgoing_and_incoming_arrays_per_mode(tmp_path: Path) -> None:
    config = _config(tmp_path)
    model = fresh_model(config, input_dim=len(resolve_schema(config.data).feature_names))
    assert outgoing_arrays(model, mode="frozen") == {}
    finetune = outgoing_arrays(model, mode="finetune")
    assert finetune and all(k.startswith("encoder.") for k in finetune)
    fedavg = outgoing_arrays(model, mode="fedavg")
    encoder, head = split_shared(fedavg)
    assert set(encoder) == set(finetune) and head and all(k.startswith("head.") for k in head)
    with pytest.raises(CheckpointError, match="does not share"):
        load_shared_arrays(model, fedavg, mode="finetune")
    shifted = {k: v + 1.0 for k, v in fedavg.items()}
    load_shared_arrays(model, shifted, mode="fedavg")
    np.testing.assert_allclose(
        outgoing_arrays(model, mode="fedavg")["head.layers.0.bias"], shifted["head.layers.0.bias"]
    )


def test_fedavg_initial_head_is_the_head_every_institution_starts_from(tmp_path: Path) -> None:
    config = _config(tmp_path, "fedavg")
    names = resolve_schema(config.data).feature_names
    model = fresh_model(config, input_dim=len(names))
    arrays = initial_shared_arrays(config, outgoing_arrays(model, mode="finetune"), input_dim=len(names))
    for key, value in outgoing_arrays(model, mode="fedavg").items():
        np.testing.assert_array_equal(arrays[key], value)
    assert set(initial_shared_arrays(_config(tmp_path), {}, input_dim=len(names))) == set()


def _context(config: FedChurnConfig) -> Context:
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )


def _train(config: FedChurnConfig, arrays: dict) -> Message:
    from flwr.app import ConfigRecord

    app = make_client_app()
    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord({"server-round": 1})})
    reply = app(Message(content=content, dst_node_id=100, message_type=MessageType.TRAIN), _context(config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def test_client_replies_per_mode(tmp_path: Path) -> None:
    for mode, expected_prefixes in (("frozen", None), ("fedavg", {"encoder.", "head."}), ("fedrep", {"encoder."})):
        config = _config(tmp_path / mode, mode)
        names = resolve_schema(config.data).feature_names
        model = fresh_model(config, input_dim=len(names))
        sent = initial_shared_arrays(config, outgoing_arrays(model, mode="finetune"), input_dim=len(names))
        reply = _train(config, sent)
        assert set(reply.content["metrics"]) == set(TRAIN_METRICS)
        if expected_prefixes is None:
            assert set(reply.content.array_records) == set(), "frozen: nothing travels back"
        else:
            back = from_array_record(reply.content["arrays"])
            assert set(back) == set(sent)
            assert {k.split(".")[0] + "." for k in back} == expected_prefixes


# --- the server ---------------------------------------------------------------------------------------


def _reply(institution: str, arrays: dict | None, n: float) -> Message:
    metrics = dict.fromkeys(TRAIN_METRICS, 0.0)
    metrics["num-examples"] = n
    records: dict = {"metrics": MetricRecord(metrics), "identity": identity_record(institution)}
    if arrays is not None:
        records["arrays"] = to_array_record(arrays)
    return Message(
        content=RecordDict(records),
        reply_to=Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN),
    )


def _strategy(mode: str, reference: dict):
    from unittest.mock import MagicMock

    # The plain weighted mean (no relative bounds), so the averages below are hand-computable.
    config = StrategyConfig(bound_multiplier=None)
    strategy = make_strategy(config, observer=None, min_available=1, transfer_mode=mode)
    grid = MagicMock()
    grid.get_node_ids.return_value = [7]
    list(strategy.configure_train(1, to_array_record(reference), __import__("flwr.app").app.ConfigRecord({}), grid))
    return strategy


def test_frozen_server_accepts_arrayless_replies_and_keeps_the_encoder() -> None:
    enc = {"encoder.w": np.zeros((2, 2), dtype=np.float32)}
    strategy = _strategy("frozen", enc)
    arrays, metrics = strategy.aggregate_train(1, [_reply("bank-a", None, 10), _reply("bank-b", None, 30)])
    assert arrays is None and metrics is None  # Flower keeps the arrays it sent: nothing aggregated
    strategy = _strategy("frozen", enc)
    accepted, dropped = strategy._screen([_reply("bank-a", enc, 10)], allowed=TRAIN_METRICS, with_arrays=False)
    assert accepted == [] and "none are expected" in dropped[0].reason


def test_head_travels_and_is_averaged_only_in_fedavg() -> None:
    ref = {"encoder.w": np.zeros(2, dtype=np.float32), "head.w": np.zeros(2, dtype=np.float32)}
    a = {k: np.full(2, 1.0, dtype=np.float32) for k in ref}
    b = {k: np.full(2, 4.0, dtype=np.float32) for k in ref}
    strategy = _strategy("fedavg", ref)
    arrays, _ = strategy.aggregate_train(1, [_reply("bank-a", a, 10), _reply("bank-b", b, 30)])
    result = from_array_record(arrays)
    np.testing.assert_allclose(result["head.w"], np.full(2, (10 * 1.0 + 30 * 4.0) / 40))  # hand-computed
    strategy = _strategy("finetune", ref)  # a server misconfigured to send a head: replies with it are refused
    accepted, dropped = strategy._screen([_reply("bank-a", a, 10)], allowed=TRAIN_METRICS, with_arrays=True)
    assert accepted == [] and "head.w" in dropped[0].reason and "does not share" in dropped[0].reason
