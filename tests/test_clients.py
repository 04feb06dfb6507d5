"""The ClientApp driven with real Flower messages, in process (no Ray): what leaves, what stays, what ε says."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedchurn.clients.app import make_client_app
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.training import steps_per_round
from fedchurn.server.app import initial_encoder
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, config_to_run_config, default_config
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.privacy_accounting import AccountantState, compute_epsilon, epsilon_of, sample_rate_for
from fedchurn.shared.wire import TRAIN_METRICS, evaluate_metrics, from_array_record, to_array_record


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _bank_key(config: FedChurnConfig, name: str) -> bytes:
    """The virtual bank's secret split key (its state folder), as the bank itself reads it."""
    from fedchurn.shared.bank_random import bank_secret_key

    return bank_secret_key(Path(config.output_dir) / "institutions" / name)[0]


def _config(tmp_path: Path, **privacy) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=500))
    return dataclasses.replace(
        base,
        output_dir=str(tmp_path / "run"),
        data=data,
        rounds=3,
        privacy=dataclasses.replace(base.privacy, **privacy),
    )


def _send(app, context: Context, arrays: dict, message_type: str, server_round: int) -> Message:
    from flwr.app import ConfigRecord

    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord({"server-round": server_round})})
    message = Message(content=content, dst_node_id=context.node_id, message_type=message_type)
    reply = app(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def _context(config: FedChurnConfig, partition: int = 0, run_id: int = 11) -> Context:
    return Context(
        run_id=run_id,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )


def test_reply_carries_encoder_and_whitelisted_metrics_only_and_epsilon_composes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    app = make_client_app()  # reads the run-config from the context, as under `flwr run`
    context = _context(config)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    heads = []
    epsilons = []
    for server_round in (1, 2, 3):
        reply = _send(app, context, encoder, MessageType.TRAIN, server_round)
        content = reply.content
        assert set(content.array_records) == {"arrays"}
        sent = from_array_record(content["arrays"])
        assert set(sent) == set(encoder), "exactly the encoder's keys travel"
        assert not any("head" in key for key in sent)
        assert set(content.metric_records) == {"metrics"}
        assert set(content["metrics"]) == set(TRAIN_METRICS)
        assert set(content.config_records) == {"identity", "ledger"}  # + the bank's signed ledger-record hash
        assert set(content["ledger"]) == {"record-hash", "signature", "public-key"}
        assert dict(content["identity"]) == {"institution": "bank-01"}
        epsilons.append(content["metrics"]["epsilon"])
        heads.append(context.state["fedchurn.head"].to_torch_state_dict())
        encoder = sent

    # The head stayed, and kept learning across rounds.
    assert not torch.equal(heads[0]["head.layers.0.weight"], heads[2]["head.layers.0.weight"])
    # ε is cumulative: after k rounds it equals one accountant run over all k rounds' steps.
    prepared = prepare_institution(config, "bank-01", split_key=_bank_key(config, "bank-01"))
    n = len(prepared.y_train)
    q = sample_rate_for(dataset_size=n, batch_size=config.training.batch_size)
    per_round = steps_per_round(
        n_train=n, batch_size=config.training.batch_size, local_epochs=config.training.local_epochs
    )
    for k, epsilon in enumerate(epsilons, start=1):
        expected = compute_epsilon(
            noise_multiplier=config.privacy.noise_multiplier, sample_rate=q, steps=k * per_round, delta=1e-5
        )
        assert epsilon == pytest.approx(expected, rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2] < 3 * epsilons[0]

    # The institution's disk mirrors its state: head and the whole accountant history.
    folder = Path(config.output_dir) / "institutions" / "bank-01"
    privacy = json.loads((folder / "privacy.json").read_text())
    assert privacy["rounds_trained"] == 3
    assert privacy["epsilon"] == pytest.approx(epsilons[-1])
    assert sum(step["steps"] for step in privacy["accountant_state"]["history"]) == 3 * per_round
    assert (folder / "head.pt").is_file() and (folder / "preprocessor.json").is_file()

    evaluation = _send(app, context, encoder, MessageType.EVALUATE, 3).content
    assert set(evaluation.array_records) == set(), "evaluation sends no weights back"
    assert set(evaluation["metrics"]) == set(evaluate_metrics(config.evaluation.bins))
    # The release is one more Gaussian step (σ_e, q = 1) composed with the training history.
    with_release = (
        AccountantState(accountant="rdp")
        .with_steps(noise_multiplier=config.privacy.noise_multiplier, sample_rate=q, steps=3 * per_round)
        .with_steps(noise_multiplier=config.evaluation.noise_multiplier, sample_rate=1.0, steps=1)
    )
    assert evaluation["metrics"]["epsilon"] == pytest.approx(epsilon_of(with_release, delta=1e-5), rel=1e-9)
    assert evaluation["metrics"]["epsilon"] > epsilons[-1]
    auc = evaluation["metrics"]["auc"]  # DP-noised; NaN when the noise left a class of ~60 test rows empty
    assert math.isnan(auc) or 0.0 <= auc <= 1.0


def test_restarted_node_resumes_and_another_run_continues_the_lifetime_epsilon(tmp_path: Path) -> None:
    config = _config(tmp_path)
    app = make_client_app()
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    n = len(prepare_institution(config, "bank-01", split_key=_bank_key(config, "bank-01")).y_train)
    q = sample_rate_for(dataset_size=n, batch_size=config.training.batch_size)
    per_round = steps_per_round(n_train=n, batch_size=config.training.batch_size, local_epochs=1)

    def expected(rounds: int) -> float:
        return compute_epsilon(noise_multiplier=1.2, sample_rate=q, steps=rounds * per_round, delta=1e-5)

    first = _send(app, _context(config), encoder, MessageType.TRAIN, 1).content["metrics"]
    # A new process: empty context.state, same run, same institution folder.
    second = _send(app, _context(config), encoder, MessageType.TRAIN, 2).content["metrics"]
    folder = Path(config.output_dir) / "institutions" / "bank-01"
    assert json.loads((folder / "privacy.json").read_text())["rounds_trained"] == 2
    assert first["epsilon"] == pytest.approx(expected(1), rel=1e-9)
    assert second["epsilon"] == pytest.approx(expected(2), rel=1e-9)
    # Another run on the same rows starts its own head and round count, but NOT its own ε: the ledger composes.
    other_run = _send(app, _context(config, run_id=12), encoder, MessageType.TRAIN, 1).content["metrics"]
    assert json.loads((folder / "privacy.json").read_text())["rounds_trained"] == 1
    assert other_run["epsilon"] == pytest.approx(expected(3), rel=1e-9)


def test_target_epsilon_is_met_over_the_whole_run(tmp_path: Path) -> None:
    config = _config(tmp_path, noise_multiplier=None, target_epsilon=2.0)
    app = make_client_app(config_to_run_config(config))
    context = _context(config, partition=1)
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    for server_round in range(1, config.rounds + 1):
        metrics = _send(app, context, encoder, MessageType.TRAIN, server_round).content["metrics"]
    # The plan keeps room for the run's one evaluation release (a Gaussian step at σ_e, after the last round):
    # training alone ends below the target, training plus the release at it.
    assert metrics["epsilon"] < 2.0
    released = _send(app, context, encoder, MessageType.EVALUATE, config.rounds).content["metrics"]
    assert metrics["epsilon"] < released["epsilon"] <= 2.0
    assert released["epsilon"] == pytest.approx(2.0, rel=0.02)


def _first_round_updates(tmp_path: Path, config: FedChurnConfig) -> list[dict[str, np.ndarray]]:
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    replies = []
    for run_id in (21, 22):
        app = make_client_app(config_to_run_config(config))
        replies.append(
            from_array_record(
                _send(app, _context(config, run_id=run_id), encoder, MessageType.TRAIN, 1).content["arrays"]
            )
        )
    return replies


def test_same_seed_gives_different_noise_by_default(tmp_path: Path) -> None:
    # The noise comes from the bank's secret randomness, not from the config's seed: the server cannot regenerate it.
    first, second = _first_round_updates(tmp_path, _config(tmp_path))
    assert any(not np.array_equal(first[key], second[key]) for key in first)


def test_same_seed_same_update_only_with_reproducible_noise(tmp_path: Path) -> None:
    first, second = _first_round_updates(tmp_path, _config(tmp_path, reproducible_noise=True))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_no_dp_run_reports_no_epsilon(tmp_path: Path) -> None:
    config = _config(tmp_path, enabled=False)
    app = make_client_app()
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    metrics = _send(app, _context(config), encoder, MessageType.TRAIN, 1).content["metrics"]
    assert metrics["epsilon"] == float("inf")
    assert metrics["noise-multiplier"] == 0.0


def test_each_virtual_bank_keeps_its_own_secret_split_key(tmp_path: Path) -> None:
    import stat

    config = _config(tmp_path)
    app = make_client_app()
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    keys = []
    for partition in (0, 1):
        _send(app, _context(config, partition=partition), encoder, MessageType.TRAIN, 1)
        path = Path(config.output_dir) / "institutions" / f"bank-0{partition + 1}" / "bank_secret.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys.append(path.read_bytes())
    assert len(keys[0]) == len(keys[1]) == 32 and keys[0] != keys[1]


def test_with_a_target_each_bank_trains_with_its_own_plan(tmp_path: Path) -> None:
    """training.plan = auto: the bank derives batch, epochs and clipping from its own n; the ledger shows what ran."""
    from fedchurn.shared.ledger import InstitutionLedger

    config = _config(tmp_path, noise_multiplier=None, target_epsilon=3.0)
    app = make_client_app(config_to_run_config(config))
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)
    for partition in (0, 1):
        _send(app, _context(config, partition=partition), encoder, MessageType.TRAIN, 1)
    homes = sorted((tmp_path / "run" / "institutions").iterdir())
    assert len(homes) == 2
    for home in homes:
        record = json.loads(InstitutionLedger.in_folder(home).entries()[-1].record_json)
        n = record["dataset_size"]
        # Hand formula: B = clamp(round(2 sqrt n), 32, 1024) and at most n // 4; round(20 / 3 rounds) = 7 epochs.
        batch = min(max(round(2 * math.sqrt(n)), 32), 1024, n // 4)
        assert record["batch_size"] == batch and record["epochs_per_round"] == 7
        assert record["clipping_norm"] == 0.5
        assert record["steps"] == 7 * math.ceil(n / batch)
        assert record["sample_rate"] == pytest.approx(1 / math.ceil(n / batch))
