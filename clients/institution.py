"""One institution's side of a round: who it is, its data, its state, and what it does with a message.

``clients/app.py`` turns Flower messages into calls here and the results back into messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from clients.budget import check_budget, record_round
from clients.evaluation import evaluate
from clients.state import InstitutionState, StateStore
from clients.training import steps_per_round
from clients.transfer import train_round_phases
from shared.config import FedChurnConfig, config_to_dict
from shared.data import PreparedInstitution, derive_seed, institution_names, prepare_institution, resolve_schema
from shared.errors import FedChurnError
from shared.model import ChurnModel, build_model, head_state, load_head_state
from shared.privacy import check_delta, resolve_noise_multiplier, sample_rate_for
from shared.sharing import load_shared_arrays, outgoing_arrays
from shared.transfer import epochs_per_round

logger = logging.getLogger(__name__)

# Node-config keys a bank's SuperNode is started with (deployment).
NODE_INSTITUTION = "institution"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"
# Node-config keys Flower's simulation gives each virtual node.
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


@dataclass(frozen=True)
class Institution:
    name: str
    config: FedChurnConfig  # the run's config, with the data section as this institution sees it
    state_dir: Path


def resolve_institution(node_config: Mapping[str, Any], config: FedChurnConfig) -> Institution:
    """Name, data and state folder from the node's config (a real bank) or its partition id (a simulation)."""
    if NODE_INSTITUTION in node_config:
        name = str(node_config[NODE_INSTITUTION])
        if NODE_DATA_PATH not in node_config:
            raise FedChurnError(
                f"node config of institution '{name}' has no '{NODE_DATA_PATH}': start the SuperNode with "
                f"--node-config \"{NODE_INSTITUTION}='{name}' {NODE_DATA_PATH}='/path/to/customers.csv'\""
            )
        data = dataclasses.replace(
            config.data,
            source="csv",
            schema=resolve_schema(config.data),
            csv_path=None,
            institution_column=None,
            institution_files={name: str(node_config[NODE_DATA_PATH])},
            institutions=(),
        )
        state_dir = Path(str(node_config.get(NODE_STATE_DIR, Path("fedchurn-state") / name)))
        return Institution(name=name, config=dataclasses.replace(config, data=data), state_dir=state_dir)
    if NODE_PARTITION_ID in node_config:
        names = _institution_names(config)
        partition = int(node_config[NODE_PARTITION_ID])
        partitions = int(node_config.get(NODE_NUM_PARTITIONS, len(names)))
        if partitions != len(names) or not 0 <= partition < len(names):
            raise FedChurnError(
                f"the simulation runs {partitions} virtual institutions but the data holds {len(names)} "
                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); start it with {len(names)} nodes"
            )
        name = names[partition]
        return Institution(name=name, config=config, state_dir=Path(config.output_dir) / "institutions" / name)
    raise FedChurnError(
        f"node config {dict(node_config)} names no institution: give '{NODE_INSTITUTION}' and '{NODE_DATA_PATH}'"
    )


_NAMES_CACHE: dict[str, list[str]] = {}
_DATA_CACHE: OrderedDict[tuple[str, str], PreparedInstitution] = OrderedDict()
# A Ray worker serves many institutions: keep their prepared rows (re-reading and re-preprocessing them for
# every message is the dearest part of a small round), bounded by bytes, least recently used out first.
_DATA_CACHE_BYTES = int(os.environ.get("FEDCHURN_WORKER_CACHE_MB", "2048")) * 2**20
_data_cache_used = 0


def _data_key(config: FedChurnConfig) -> str:
    return json.dumps([config.seed, config_to_dict(config)["data"]], sort_keys=True)


def _institution_names(config: FedChurnConfig) -> list[str]:
    key = _data_key(config)
    if key not in _NAMES_CACHE:
        _NAMES_CACHE[key] = institution_names(config.data, seed=config.seed, output_dir=config.output_dir)
    return _NAMES_CACHE[key]


def load_data(institution: Institution) -> PreparedInstitution:
    """The institution's prepared splits, cached per worker and keyed by institution and data config."""
    key = (_data_key(institution.config), institution.name)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    prepared = prepare_institution(institution.config, institution.name)
    global _data_cache_used
    _DATA_CACHE[key] = prepared
    _data_cache_used += _nbytes(prepared)
    while len(_DATA_CACHE) > 1 and _data_cache_used > _DATA_CACHE_BYTES:
        _data_cache_used -= _nbytes(_DATA_CACHE.popitem(last=False)[1])
    return prepared


def _nbytes(prepared: PreparedInstitution) -> int:
    arrays = (prepared.x_train, prepared.y_train, prepared.x_val, prepared.y_val, prepared.x_test, prepared.y_test)
    return sum(a.nbytes for a in arrays)


def _device(config: FedChurnConfig) -> torch.device:
    """A GPU when the institution was given one (simulation.client_num_gpus > 0) and CUDA sees it."""
    if config.simulation.client_num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _build_model(institution: Institution, data: PreparedInstitution, state: InstitutionState) -> ChurnModel:
    # Every institution's head starts from the same seeded weights: their encoders then drift alike in
    # early rounds, so averaging them does not scramble what the heads learned.
    torch.manual_seed(derive_seed(institution.config.seed, "head"))
    model = build_model(institution.config.model, input_dim=len(data.feature_names)).to(_device(institution.config))
    if state.head is not None:
        load_head_state(model, state.head, what=f"saved head of {institution.name} in {institution.state_dir}")
    return model


@dataclass(frozen=True)
class TrainResult:
    encoder: dict[str, np.ndarray]
    metrics: dict[str, float]


def train_round(
    institution: Institution,
    *,
    encoder: Mapping[str, np.ndarray],
    server_round: int,
    proximal_mu: float,
    run_id: int,
    context_state: RecordDict,
) -> TrainResult:
    """Fine-tune on local data from the sent encoder; keep the head; report the encoder and cumulative ε."""
    config = institution.config
    data = load_data(institution)
    # Keyed by the fedchurn run name when set: a resumed run continues this institution's accounting.
    store = StateStore(
        institution.state_dir, run_id=config.federation.identity(run_id), accountant=config.privacy.accountant
    )
    state = store.load(context_state)
    model = _build_model(institution, data, state)
    load_shared_arrays(model, encoder, mode=config.transfer.mode)

    n_train = len(data.y_train)
    sample_rate = sample_rate_for(dataset_size=n_train, batch_size=config.training.batch_size)
    if config.privacy.enabled:
        check_delta(delta=config.privacy.delta, dataset_size=n_train)
        if state.noise_multiplier is None:
            per_round = steps_per_round(
                n_train=n_train, batch_size=config.training.batch_size, local_epochs=epochs_per_round(config)
            )
            state.noise_multiplier = resolve_noise_multiplier(
                config.privacy, sample_rate=sample_rate, total_steps=per_round * config.rounds
            )
    round_steps = steps_per_round(
        n_train=n_train, batch_size=config.training.batch_size, local_epochs=epochs_per_round(config)
    )
    # Declines (raises BudgetDeclined) when this round would take ε past the institution's budget.
    check_budget(institution, state, server_round=server_round, sample_rate=sample_rate, steps=round_steps)
    report = train_round_phases(
        model,
        data.x_train,
        data.y_train,
        config=config,
        accountant=state.accountant,
        noise_multiplier=state.noise_multiplier or 0.0,
        proximal_mu=proximal_mu,
        seed=derive_seed(config.seed, institution.name, server_round, "train"),
    )
    if state.rounds_trained == 0:  # fixed for the run: written to the bank's disk once, for scoring later
        state.preprocessor = data.preprocessor.to_dict()
    state.accountant = report.accountant
    state.head = head_state(model)
    state.rounds_trained += 1
    state.last_epsilon = report.epsilon
    store.save(state, context_state)
    record_round(
        institution,
        state,
        run_id=config.federation.identity(run_id),
        server_round=server_round,
        noise_multiplier=report.noise_multiplier,
        sample_rate=report.sample_rate,
        steps=report.steps,
        dataset_size=n_train,
        epsilon=report.epsilon,
    )
    logger.info(
        "%s round %d: loss %.4f, epsilon %.3f after %d steps",
        institution.name,
        server_round,
        report.loss,
        report.epsilon,
        report.accountant.total_steps,
    )
    metrics = {
        "num-examples": float(n_train),
        "train-loss": report.loss if math.isfinite(report.loss) else 0.0,
        "epsilon": report.epsilon,
        "delta": report.delta,
        "noise-multiplier": report.noise_multiplier,
        "sample-rate": report.sample_rate,
        "steps": float(report.steps),
        "total-steps": float(report.accountant.total_steps),
    }
    return TrainResult(encoder=outgoing_arrays(model, mode=config.transfer.mode), metrics=metrics)


def evaluate_round(
    institution: Institution, *, encoder: Mapping[str, np.ndarray], run_id: int, context_state: RecordDict
) -> dict[str, float]:
    """Global encoder + this institution's own head, on its own validation and test rows."""
    config = institution.config
    data = load_data(institution)
    state = StateStore(
        institution.state_dir, run_id=config.federation.identity(run_id), accountant=config.privacy.accountant
    ).load(context_state)
    model = _build_model(institution, data, state)
    load_shared_arrays(model, encoder, mode=config.transfer.mode)
    test = evaluate(model, data.x_test, data.y_test)
    validation = evaluate(model, data.x_val, data.y_val)
    privacy_on = config.privacy.enabled
    return {
        "num-examples": float(len(data.y_test)),
        "auc": test["auc"],
        "pr-auc": test["pr_auc"],
        "brier": test["brier"],
        "accuracy": test["accuracy"],
        "loss": test["loss"],
        "val-auc": validation["auc"],
        "epsilon": state.last_epsilon if privacy_on else math.inf,
        "delta": config.privacy.delta if privacy_on else 0.0,
        "n-train": float(len(data.y_train)),
        "n-test": float(len(data.y_test)),
    }
