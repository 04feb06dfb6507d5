"""Flower ClientApp: one institution. Translates messages to domain calls and back, nothing else.

The reply carries the encoder arrays, whitelisted metrics, the institution's name and the bank's signature of
its ledger record (``ledger``) — never the head, never rows of data. Every exception is caught here: the reply
then carries a code from the fixed list in ``shared/decline.py`` and nothing else; the exception's text, paths and
values go to the bank's own log only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedchurn.clients.budget import BankDeclined, store_countersignature
from fedchurn.clients.institution import evaluate_round, resolve_institution, train_round
from fedchurn.clients.institution_identity import Institution
from fedchurn.clients.private_evaluation import EvaluationWithheld
from fedchurn.clients.warmup import warm_up
from fedchurn.shared.config import FedChurnConfig, config_from_run_config
from fedchurn.shared.decline import ERROR_CONFIG, ERROR_DATA, ERROR_INTERNAL, ERROR_STATE, Decline, decline_content
from fedchurn.shared.errors import CheckpointError, ConfigError, DataError, PrivacyError
from fedchurn.shared.ledger import LedgerError
from fedchurn.shared.ledger_signing import COUNTERSIGNATURE_FIELD, WIRE_KEY
from fedchurn.shared.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    IDENTITY_KEY,
    METRICS_KEY,
    TRAIN_METRICS,
    evaluate_metrics,
    from_array_record,
    identity_record,
    to_array_record,
    whitelisted_metrics,
)

logger = logging.getLogger(__name__)

_CONFIG_CACHE: dict[str, FedChurnConfig] = {}


def _config(run_config: Mapping[str, Any]) -> FedChurnConfig:
    key = json.dumps(dict(run_config), sort_keys=True)
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = config_from_run_config(run_config)
    return _CONFIG_CACHE[key]


def _institution(context: Context, bound: Mapping[str, Any] | None) -> Institution:
    config = _config(bound if bound is not None else context.run_config)
    # One torch thread per worker: two threads per worker on two cores ran up to 30x slower.
    torch.set_num_threads(max(1, int(config.simulation.client_num_cpus)))
    return resolve_institution(context.node_config, config)


def error_code(error: BaseException) -> str:
    """The fixed code an exception is reported as; its text never leaves the bank."""
    if isinstance(error, DataError):
        return ERROR_DATA
    if isinstance(error, (ConfigError, PrivacyError)):  # PrivacyError: a setting that cannot hold (δ >= 1/n, ...)
        return ERROR_CONFIG
    if isinstance(error, (LedgerError, CheckpointError, OSError)):
        return ERROR_STATE
    return ERROR_INTERNAL


def _guarded(kind: str, handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:  # the privacy boundary: nothing of the exception leaves
            name = str(context.node_config.get("institution", f"node-{context.node_id}"))
            code = error_code(error)
            logger.exception("%s: %s failed; the server is told only '%s'", name, kind, code)
            return Message(content=decline_content(name, Decline.code_only(code)), reply_to=msg)

    return run


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` binds the run's config (in-process simulation), else Flower's is used."""
    app = ClientApp()

    def train(msg: Message, context: Context) -> Message:
        institution = _institution(context, run_config)
        round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        if COUNTERSIGNATURE_FIELD in round_config:  # the server's countersignature of our last ledger record
            store_countersignature(institution, round_config[COUNTERSIGNATURE_FIELD])
        try:
            result = train_round(
                institution,
                encoder=from_array_record(msg.content[ARRAYS_KEY]),  # type: ignore[arg-type]
                server_round=int(round_config.get("server-round", 0)),  # type: ignore[arg-type]
                proximal_mu=float(round_config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
                run_id=context.run_id,
                context_state=context.state,
            )
        except BankDeclined as declined:  # its policy or its budget refuses the round (shared/decline.py)
            return Message(content=decline_content(institution.name, declined.decline), reply_to=msg)
        content = RecordDict(
            {
                # transfer.mode 'frozen' sends nothing back: no array record at all
                **({ARRAYS_KEY: to_array_record(result.encoder)} if result.encoder else {}),
                METRICS_KEY: whitelisted_metrics(result.metrics, TRAIN_METRICS),
                IDENTITY_KEY: identity_record(institution.name),
                # the bank's signature of this round's ledger record, for the server to countersign
                **({WIRE_KEY: ConfigRecord(result.ledger.to_wire())} if result.ledger is not None else {}),
            }
        )
        return Message(content=content, reply_to=msg)

    def evaluate(msg: Message, context: Context) -> Message:
        institution = _institution(context, run_config)
        round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        if COUNTERSIGNATURE_FIELD in round_config:  # this round's record, countersigned after the train replies
            store_countersignature(institution, round_config[COUNTERSIGNATURE_FIELD])
        try:
            metrics = evaluate_round(
                institution,
                encoder=from_array_record(msg.content[ARRAYS_KEY]),  # type: ignore[arg-type]
                run_id=context.run_id,
                context_state=context.state,
                server_round=int(round_config.get("server-round", 0)),  # type: ignore[arg-type]
            )
        except EvaluationWithheld as withheld:  # nothing about its rows may leave now (clients/private_evaluation.py)
            return Message(content=decline_content(institution.name, withheld.decline), reply_to=msg)
        content = RecordDict(
            {
                METRICS_KEY: whitelisted_metrics(metrics, evaluate_metrics(institution.config.evaluation.bins)),
                IDENTITY_KEY: identity_record(institution.name),
            }
        )
        return Message(content=content, reply_to=msg)

    def query(msg: Message, context: Context) -> Message:
        """The server's warm-up: prepare this institution's data and warm torch. The reply is an empty
        acknowledgement whatever happens: no name, no error code, nothing about the rows (a failure shows again,
        as a coded decline, in round 1)."""
        try:
            warm_up(_institution(context, run_config))
        except Exception:  # nothing of it leaves; round 1 meets the same problem and declines with its code
            logger.exception("warm-up failed; the server is sent only the empty acknowledgement")
        return Message(content=RecordDict(), reply_to=msg)

    app.train()(_guarded("train", train))
    app.evaluate()(_guarded("evaluate", evaluate))
    app.query()(query)
    return app


app = make_client_app()  # `flwr run` loads this; it reads the run-config Flower gives it
