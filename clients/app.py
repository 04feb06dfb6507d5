"""Flower ClientApp: one institution. Translates messages to domain calls and back, nothing else.

The reply carries the encoder arrays, whitelisted metrics, the institution's name and the bank's signature of
its ledger record (``ledger``) — never the head, never rows of data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.budget import BudgetDeclined, store_countersignature
from clients.institution import Institution, evaluate_round, resolve_institution, train_round
from shared.config import FedChurnConfig, config_from_run_config
from shared.decline import decline_content
from shared.ledger_signing import COUNTERSIGNATURE_FIELD, WIRE_KEY
from shared.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE_METRICS,
    IDENTITY_KEY,
    METRICS_KEY,
    TRAIN_METRICS,
    from_array_record,
    identity_record,
    to_array_record,
    whitelisted_metrics,
)

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


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` binds the run's config (in-process simulation), else Flower's is used."""
    app = ClientApp()

    @app.train()
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
        except BudgetDeclined as declined:  # its privacy budget allows no further round: say so (shared/decline.py)
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

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        institution = _institution(context, run_config)
        round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        if COUNTERSIGNATURE_FIELD in round_config:  # this round's record, countersigned after the train replies
            store_countersignature(institution, round_config[COUNTERSIGNATURE_FIELD])
        metrics = evaluate_round(
            institution,
            encoder=from_array_record(msg.content[ARRAYS_KEY]),  # type: ignore[arg-type]
            run_id=context.run_id,
            context_state=context.state,
        )
        content = RecordDict(
            {
                METRICS_KEY: whitelisted_metrics(metrics, EVALUATE_METRICS),
                IDENTITY_KEY: identity_record(institution.name),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()  # `flwr run` loads this; it reads the run-config Flower gives it
