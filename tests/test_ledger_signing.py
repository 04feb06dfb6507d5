"""Signed ledgers: the bank signs each record, the server countersigns, hostile input is refused without a crash."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedchurn.clients.app import make_client_app
from fedchurn.server.app import initial_encoder
from fedchurn.server.privacy_oversight import PrivacyOversight
from fedchurn.server.strategy import Reply
from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, config_to_run_config, default_config
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.ledger import InstitutionLedger, SignedHash
from fedchurn.shared.ledger_signing import (
    BANK_KEY_FILE,
    COUNTERSIGNATURE_FIELD,
    load_or_create_signer,
    load_signer,
    parse_countersignature,
    parse_wire,
    verify,
)
from fedchurn.shared.wire import from_array_record, to_array_record

HASH = "ab" * 32


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def test_signature_verifies_only_for_its_hash_key_and_role(tmp_path: Path) -> None:
    bank = load_or_create_signer(tmp_path / "bank.pem", "bank")
    server = load_or_create_signer(tmp_path / "server.pem", "consortium")
    signed = bank.sign(HASH)
    assert verify(signed, "bank")
    assert not verify(signed, "consortium")  # a bank's signature never passes as a countersignature
    assert not verify(dataclasses.replace(signed, record_hash="cd" * 32), "bank")
    assert not verify(dataclasses.replace(signed, public_key=server.public_key), "bank")
    assert not verify(dataclasses.replace(signed, signature="not base64!"), "bank")
    assert not verify(dataclasses.replace(signed, public_key="-----BEGIN PUBLIC KEY-----\nxx"), "bank")


def test_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / BANK_KEY_FILE
    first = load_or_create_signer(path, "bank")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_signer(path, "bank").public_key == first.public_key


def test_a_supernode_openssh_node_key_signs(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "node-auth"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    signer = load_signer(path, "bank")
    assert verify(signer.sign(HASH), "bank")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"record-hash": HASH, "signature": "x" * 300, "public-key": "k"},
        {"record-hash": HASH, "signature": "AAAA", "public-key": "k" * 5000},
        {"record-hash": 5, "signature": "AAAA", "public-key": "k"},
        {"record-hash": HASH, "signature": "AAAA", "public-key": "k", "extra": "1"},
    ],
)
def test_hostile_wire_records_are_refused_with_a_fixed_reason(fields: dict) -> None:
    reason = parse_wire(fields, "bank")
    assert isinstance(reason, str) and "k" * 50 not in reason and "x" * 50 not in reason


def test_forged_signature_on_the_wire_is_refused(tmp_path: Path) -> None:
    signed = load_or_create_signer(tmp_path / "b.pem", "bank").sign(HASH)
    forged = dict(signed.to_wire(), signature=base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode())
    assert isinstance(parse_wire(forged, "bank"), str)
    assert isinstance(parse_wire(signed.to_wire(), "bank"), SignedHash)
    for text in (None, 5, "{", "[]", "x" * 5000):
        assert isinstance(parse_countersignature(text), str)


def test_ledger_stores_signatures_and_pins_the_consortium_key(tmp_path: Path) -> None:
    bank = load_or_create_signer(tmp_path / "bank.pem", "bank")
    server = load_or_create_signer(tmp_path / "server.pem", "consortium")
    other = load_or_create_signer(tmp_path / "other.pem", "consortium")
    ledger = InstitutionLedger.in_folder(tmp_path / "bank")
    first = ledger.append({"kind": "train", "round": 1}, sign=bank.sign)
    second = ledger.append({"kind": "train", "round": 2}, sign=bank.sign)
    signatures = ledger.signatures()
    assert [signatures[i].record_hash for i in (1, 2)] == [first.hash, second.hash]
    assert all(verify(s, "bank") for s in signatures.values())

    assert ledger.add_countersignature(server.sign(first.hash)) is None
    assert ledger.pinned_consortium_key() == server.public_key
    assert ledger.add_countersignature(server.sign(first.hash)) == "the record is already countersigned"
    assert ledger.add_countersignature(server.sign(HASH)) == "no record of this ledger has that hash"
    assert "pinned" in (ledger.add_countersignature(other.sign(second.hash)) or "")
    assert ledger.add_countersignature(server.sign(second.hash)) is None
    assert sorted(ledger.countersignatures()) == [1, 2]


def _config(tmp_path: Path) -> FedChurnConfig:
    base = default_config()
    data = dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=400))
    return dataclasses.replace(base, output_dir=str(tmp_path / "run"), data=data, rounds=10)


def _send(app, context: Context, encoder: dict, server_round: int, extra: dict | None = None) -> Message:
    config = ConfigRecord({"server-round": server_round, **(extra or {})})
    content = RecordDict({"arrays": to_array_record(encoder), "config": config})
    reply = app(Message(content=content, dst_node_id=context.node_id, message_type=MessageType.TRAIN), context)
    assert not reply.has_error()
    return reply


def test_bank_signs_each_round_and_keeps_only_valid_countersignatures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ClientApp with real messages; the 'server' here also plays hostile: junk, forgeries, a swapped key."""
    config = _config(tmp_path)
    app = make_client_app()
    context = Context(
        run_id=7,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )
    server = load_or_create_signer(tmp_path / "server.pem", "consortium")
    impostor = load_or_create_signer(tmp_path / "impostor.pem", "consortium")
    encoder = initial_encoder(config, resolve_schema(config.data).feature_names)

    reply = _send(app, context, encoder, 1)
    signed = parse_wire(dict(reply.content["ledger"]), "bank")
    assert isinstance(signed, SignedHash)
    folder = Path(config.output_dir) / "institutions" / "bank-01"
    ledger = InstitutionLedger.in_folder(folder)
    assert signed.record_hash == ledger.entries()[0].hash
    assert signed.public_key == load_signer(folder / BANK_KEY_FILE, "bank").public_key

    hostile = [
        "garbage",
        json.dumps({"record-hash": signed.record_hash, "signature": "AAAA", "public-key": server.public_key}),
        impostor.sign("cd" * 32).to_text(),  # a valid signature of a hash the bank never recorded
    ]
    with caplog.at_level(logging.WARNING):
        for server_round, text in enumerate(hostile, start=2):
            reply = _send(
                app, context, from_array_record(reply.content["arrays"]), server_round, {COUNTERSIGNATURE_FIELD: text}
            )
    assert ledger.countersignatures() == {}
    assert "ignoring a ledger countersignature" in caplog.text and "garbage" not in caplog.text
    assert len(ledger.entries()) == 4  # every round still trained and was recorded

    entries = ledger.entries()
    reply = _send(app, context, encoder, 5, {COUNTERSIGNATURE_FIELD: server.sign(entries[0].hash).to_text()})
    # Once pinned, another consortium key is refused even for a real record of this bank.
    _send(app, context, encoder, 6, {COUNTERSIGNATURE_FIELD: impostor.sign(entries[1].hash).to_text()})
    stored = ledger.countersignatures()
    assert list(stored) == [1] and stored[1].public_key == server.public_key and verify(stored[1], "consortium")
    assert ledger.pinned_consortium_key() == server.public_key


def _reply(name: str, node: int, ledger: dict | None) -> Reply:
    from fedchurn.shared.wire import identity_record

    content = RecordDict({"identity": identity_record(name), "metrics": MetricRecord({"num-examples": 10.0})})
    if ledger is not None:
        content["ledger"] = ConfigRecord(ledger)
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Reply(
        institution=name, metrics={"num-examples": 10.0}, message=Message(content=content, reply_to=sent), weight=10.0
    )


def test_server_countersigns_valid_records_and_refuses_hostile_ones(tmp_path: Path) -> None:
    config = dataclasses.replace(_config(tmp_path), output_dir=str(tmp_path / "server"))
    oversight = PrivacyOversight(config, tmp_path / "server", run_id=1)
    bank = load_or_create_signer(tmp_path / "bank.pem", "bank")
    other = load_or_create_signer(tmp_path / "other.pem", "bank")
    good = bank.sign(HASH).to_wire()
    replies = [
        _reply("bank-01", 101, good),
        _reply("bank-02", 102, {"record-hash": HASH, "signature": "AAAA", "public-key": "x" * 4000}),
        _reply("bank-03", 103, None),
    ]
    oversight.on_train(1, replies, [])
    # bank-01 then signs with another key: refused (a member is known by the key it first used).
    oversight.on_train(2, [_reply("bank-01", 101, other.sign("cd" * 32).to_wire())], [])
    records = [e.record for e in oversight.ledger.entries()]
    first = {r["institution"]: r for r in records if r["round"] == 1}
    assert first["bank-01"]["bank_ledger"] == good
    counter = first["bank-01"]["consortium_countersignature"]
    assert verify(SignedHash(counter["record-hash"], counter["signature"], counter["public-key"]), "consortium")
    assert first["bank-02"]["bank_ledger"] is None and "x" * 20 not in first["bank-02"]["bank_ledger_problem"]
    assert first["bank-03"]["bank_ledger_problem"] == "the reply carried no signed ledger record"
    second = next(r for r in records if r["round"] == 2)
    assert second["bank_ledger"] is None and "other than the one" in second["bank_ledger_problem"]

    # The countersignature rides in that bank's next message only; the shared payload is not touched.
    shared = RecordDict({"config": ConfigRecord({"server-round": 3})})
    messages = [Message(content=shared, dst_node_id=n, message_type=MessageType.TRAIN) for n in (101, 102)]
    out = oversight.with_countersignatures(messages)
    text = out[0].content["config"][COUNTERSIGNATURE_FIELD]
    assert isinstance(parse_countersignature(text), SignedHash) and json.loads(text)["record-hash"] == HASH
    assert COUNTERSIGNATURE_FIELD not in out[1].content["config"] and COUNTERSIGNATURE_FIELD not in shared["config"]
    assert out[0].content["config"]["server-round"] == 3 and out[0].metadata.dst_node_id == 101
