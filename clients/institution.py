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
from typing import Any, NoReturn

import numpy as np
import torch
from flwr.app import RecordDict

from fedchurn.clients.budget import BankDeclined, check_budget, lifetime_cap, lifetime_history, record_round
from fedchurn.clients.institution_identity import Institution
from fedchurn.clients.policy_check import check_instruction
from fedchurn.clients.prepared_institution import PreparedInstitution, prepare_institution
from fedchurn.clients.private_evaluation import private_evaluation
from fedchurn.clients.private_metrics import evaluation_settings
from fedchurn.clients.splits import UnbalancedSplitError
from fedchurn.clients.state import InstitutionState, StateStore
from fedchurn.clients.training import steps_per_round
from fedchurn.clients.transfer import train_round_phases
from fedchurn.shared.bank_random import SeedSource, bank_secret_key, derive_seed, renew_bank_secret_key
from fedchurn.shared.config import FedChurnConfig, config_to_dict
from fedchurn.shared.decline import BUDGET_EXHAUSTED, DELTA_TOO_HIGH_FOR_ROWS, Decline
from fedchurn.shared.dp_planning import bank_training_config
from fedchurn.shared.errors import FedChurnError, PrivacyError
from fedchurn.shared.institution_rows import institution_names, resolve_schema
from fedchurn.shared.ledger import SignedHash
from fedchurn.shared.model import ChurnModel, build_model, head_state, load_head_state
from fedchurn.shared.policy import (
    CONSERVATIVE_POLICY,
    POLICY_TOO_MANY_ROUNDS,
    BankPolicy,
    load_policy,
    policy_for_simulated_bank,
)
from fedchurn.shared.privacy_accounting import (
    AccountantState,
    check_delta,
    epsilon_of,
    noise_multiplier_after,
    sample_rate_for,
)
from fedchurn.shared.sharing import load_shared_arrays, outgoing_arrays
from fedchurn.shared.transfer import epochs_per_round
from fedchurn.shared.wire import WEIGHT_KEY

logger = logging.getLogger(__name__)

# Node-config keys a bank's SuperNode is started with (deployment).
NODE_INSTITUTION = "institution"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"
NODE_POLICY = "policy"  # path of the bank's privacy policy (YAML); absent: the conservative built-in policy
NODE_LEDGER_KEY = "ledger-key"  # optional: the SuperNode's node-auth private key signs its ledger records
# Node-config keys Flower's simulation gives each virtual node.
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


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
        key = node_config.get(NODE_LEDGER_KEY)
        return Institution(
            name=name,
            config=dataclasses.replace(config, data=data),
            state_dir=state_dir,
            real_bank=True,
            policy=_real_bank_policy(name, node_config),
            ledger_key=Path(str(key)) if key else None,
        )
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
        return Institution(
            name=name,
            config=config,
            state_dir=Path(config.output_dir) / "institutions" / name,
            policy=policy_for_simulated_bank(config.policy, name),  # the same checks as a real bank's
        )
    raise FedChurnError(
        f"node config {dict(node_config)} names no institution: give '{NODE_INSTITUTION}' and '{NODE_DATA_PATH}'"
    )


_DEFAULT_POLICY_LOGGED: set[str] = set()


def _real_bank_policy(name: str, node_config: Mapping[str, Any]) -> BankPolicy:
    """The policy file named by the node config, else the conservative built-in policy (logged once)."""
    if NODE_POLICY in node_config:
        return load_policy(str(node_config[NODE_POLICY]))
    if name not in _DEFAULT_POLICY_LOGGED:
        _DEFAULT_POLICY_LOGGED.add(name)
        logger.warning(
            "%s: no '%s' in the node config: using the conservative built-in policy %s",
            name,
            NODE_POLICY,
            CONSERVATIVE_POLICY,
        )
    return CONSERVATIVE_POLICY


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
    """The institution's prepared splits, cached per worker and keyed by institution, state folder and data config.

    The split is keyed by the bank's secret key (its state folder; shared/bank_random), or under the research
    switch ``privacy.reproducible_noise`` by a key derived from the config's seed.
    """
    reproducible = institution.config.privacy.reproducible_noise
    key = (_data_key(institution.config), f"{institution.name}\x1f{institution.state_dir}\x1f{reproducible}")
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    prepared = _prepare(institution)
    global _data_cache_used
    _DATA_CACHE[key] = prepared
    _data_cache_used += _nbytes(prepared)
    while len(_DATA_CACHE) > 1 and _data_cache_used > _DATA_CACHE_BYTES:
        _data_cache_used -= _nbytes(_DATA_CACHE.popitem(last=False)[1])
    return prepared


def _prepare(institution: Institution) -> PreparedInstitution:
    if institution.config.privacy.reproducible_noise:
        return prepare_institution(institution.config, institution.name)  # a key derived from the seed
    split_key, created = bank_secret_key(institution.state_dir)
    for attempt in range(_KEY_ATTEMPTS):
        try:
            return prepare_institution(institution.config, institution.name, split_key=split_key)
        except UnbalancedSplitError:
            # A key this very call created has split nothing anyone used: another secret key is no reshuffle of
            # trained rows. A key already in use is never replaced here: the error names the fix.
            if not created or attempt == _KEY_ATTEMPTS - 1:
                raise
            split_key = renew_bank_secret_key(institution.state_dir)
    raise AssertionError("unreachable")  # pragma: no cover


_KEY_ATTEMPTS = 8


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


def _seeds(institution: Institution, server_round: int) -> SeedSource:
    """Fresh secret seeds (the OS CSPRNG) for this call's noise and batches; seeded only under the research switch."""
    if institution.config.privacy.reproducible_noise:
        return SeedSource(reproducible_from=(institution.config.seed, institution.name, server_round, "train"))
    return SeedSource()


@dataclass(frozen=True)
class TrainResult:
    encoder: dict[str, np.ndarray]
    metrics: dict[str, float]
    ledger: SignedHash | None = None  # the bank's signature of this round's ledger record (sent to be countersigned)


def train_round(
    institution: Institution,
    *,
    encoder: Mapping[str, np.ndarray],
    server_round: int,
    proximal_mu: float,
    run_id: int,
    context_state: RecordDict,
) -> TrainResult:
    """Check the instruction against the bank's policy, then fine-tune within its lifetime budget.

    Raises :class:`BankDeclined` (a decline with a code) when the policy or the budget refuses the round.
    """
    config = institution.config
    _check_policy(institution, server_round)  # before the data is touched
    data = load_data(institution)
    # training.plan = auto: batch, epochs, learning rate and clipping from the bank's own row count, at home.
    institution = dataclasses.replace(
        institution, config=bank_training_config(institution.config, n_train=len(data.y_train))
    )
    config = institution.config
    # Keyed by the fedchurn run name when set: a resumed run continues this bank's head and round count.
    store = StateStore(
        institution.state_dir, run_id=config.federation.identity(run_id), accountant=config.privacy.accountant
    )
    state = store.load(context_state)
    policy = institution.policy
    if policy.max_rounds_per_run is not None and state.rounds_trained >= policy.max_rounds_per_run:
        _decline_policy(
            institution,
            server_round,
            POLICY_TOO_MANY_ROUNDS,
            f"this run already trained {state.rounds_trained} rounds: max_rounds_per_run = {policy.max_rounds_per_run}",
        )
    lifetime = lifetime_history(institution, fingerprint=data.fingerprint)

    n_train = len(data.y_train)
    sample_rate = sample_rate_for(dataset_size=n_train, batch_size=config.training.batch_size)
    round_steps = steps_per_round(
        n_train=n_train, batch_size=config.training.batch_size, local_epochs=epochs_per_round(config)
    )
    if config.privacy.enabled:
        try:
            check_delta(delta=config.privacy.delta, dataset_size=n_train)
        except PrivacyError as refused:  # n and the message stay here; the server gets the fixed code only
            _decline_policy(institution, server_round, DELTA_TOO_HIGH_FOR_ROWS, str(refused))
        _plan_noise(institution, state, lifetime, server_round=server_round, sample_rate=sample_rate, steps=round_steps)
    sigma = (state.noise_multiplier or 0.0) if config.privacy.enabled else 0.0
    # Declines (raises BankDeclined) when this round would take the lifetime ε past the bank's cap.
    check_budget(
        institution,
        lifetime,
        server_round=server_round,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=round_steps,
        rounds_trained=state.rounds_trained,
    )
    model = _build_model(institution, data, state)
    load_shared_arrays(model, encoder, mode=config.transfer.mode)
    report = train_round_phases(
        model,
        data.x_train,
        data.y_train,
        config=config,
        accountant=lifetime,  # the lifetime history: the ε reported is the bank's lifetime ε
        noise_multiplier=sigma,
        proximal_mu=proximal_mu,
        seed=_seeds(institution, server_round).next_seed(),
    )
    if state.rounds_trained == 0:  # fixed for the run: written to the bank's disk once, for scoring later
        state.preprocessor = data.preprocessor.to_dict()
    if config.privacy.enabled:  # this run's own history (privacy.json); the ledger holds the lifetime
        state.accountant = state.accountant.with_steps(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=report.steps
        )
    state.head = head_state(model)
    state.rounds_trained += 1
    state.last_epsilon = report.epsilon
    store.save(state, context_state)
    signed = record_round(
        institution,
        run_id=config.federation.identity(run_id),
        server_round=server_round,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=report.steps,
        dataset_size=n_train,
        dataset_fingerprint=data.fingerprint,
        accountant=config.privacy.accountant,
        cumulative_steps=state.accountant.total_steps,
        rounds_trained=state.rounds_trained,
        epsilon=report.epsilon,
    )
    logger.info(
        "%s round %d: loss %.4f, lifetime epsilon %.3f (%d steps this run)",
        institution.name,
        server_round,
        report.loss,
        report.epsilon,
        state.accountant.total_steps,
    )
    metrics = {
        # FedAvg weight: the exact row count only when the bank's policy allows it (report_dataset_size).
        WEIGHT_KEY: float(n_train) if policy.report_dataset_size else 1.0,
        "epsilon": report.epsilon,
        "delta": report.delta,
        "noise-multiplier": report.noise_multiplier,
    }
    return TrainResult(encoder=outgoing_arrays(model, mode=config.transfer.mode), metrics=metrics, ledger=signed)


def _check_policy(institution: Institution, server_round: int) -> None:
    violation = check_instruction(institution.policy, institution.config, real_bank=institution.real_bank)
    if violation is not None:
        _decline_policy(institution, server_round, violation.code, violation.detail)


def _decline_policy(institution: Institution, server_round: int, code: str, detail: str) -> NoReturn:
    # The detail (which rule refused which value) stays in the bank's own log; the server gets the code.
    logger.warning("%s declines round %d by its own policy: %s [%s]", institution.name, server_round, detail, code)
    raise BankDeclined(institution.name, server_round, Decline.code_only(code), detail)


def _plan_noise(
    institution: Institution,
    state: InstitutionState,
    lifetime: AccountantState,
    *,
    server_round: int,
    sample_rate: float,
    steps: int,
) -> None:
    """σ for this run: the given one, or planned from target_epsilon so the LIFETIME ε at the end of the planned
    run (history + the rounds still to train) is at most the target. A resume that adds rounds re-plans σ for the
    rounds left; when no σ can keep the target, the bank declines."""
    privacy = institution.config.privacy
    rounds = institution.config.rounds
    if privacy.noise_multiplier is not None:
        state.noise_multiplier = float(privacy.noise_multiplier)
        return
    if state.noise_multiplier is not None and state.planned_rounds == rounds:
        return
    if privacy.target_epsilon is None:  # PrivacyConfig refuses this
        raise PrivacyError("give privacy.noise_multiplier or privacy.target_epsilon")
    cap = lifetime_cap(institution)
    target = privacy.target_epsilon if cap is None else min(privacy.target_epsilon, cap)
    remaining = max(rounds - state.rounds_trained, 1)
    # The evaluation releases still to come are spent from the same target: plan them in before σ.
    evaluation = evaluation_settings(institution.config, policy=institution.policy)
    releases = evaluation.planned_releases(remaining)
    planned = lifetime
    if releases:
        planned = lifetime.with_steps(noise_multiplier=evaluation.noise_multiplier, sample_rate=1.0, steps=releases)
    try:
        sigma = noise_multiplier_after(
            planned, target_epsilon=target, delta=privacy.delta, sample_rate=sample_rate, steps=remaining * steps
        )
    except PrivacyError as error:
        spent = epsilon_of(lifetime, delta=privacy.delta)
        logger.warning("%s declines round %d: %s", institution.name, server_round, error)
        raise BankDeclined(
            institution.name,
            server_round,
            Decline(
                reason=BUDGET_EXHAUSTED,
                epsilon=spent,
                projected_epsilon=math.inf,
                max_epsilon=target,
                delta=privacy.delta,
                rounds_trained=state.rounds_trained,
            ),
        ) from None
    floor = institution.policy.min_noise_multiplier
    if sigma < floor:
        logger.info("%s: planned σ %.4g raised to the policy's minimum %.4g", institution.name, sigma, floor)
        sigma = floor
    logger.info(
        "%s: σ %.4f keeps the lifetime ε <= %.3g over %d more rounds (ε spent so far %.3g)",
        institution.name,
        sigma,
        target,
        remaining,
        epsilon_of(lifetime, delta=privacy.delta),
    )
    state.noise_multiplier = sigma
    state.planned_rounds = rounds


def evaluate_round(
    institution: Institution,
    *,
    encoder: Mapping[str, np.ndarray],
    run_id: int,
    context_state: RecordDict,
    server_round: int = 0,
) -> dict[str, float]:
    """Global encoder + this institution's own head on its own rows (histograms), released only under DP.

    Raises :class:`~clients.private_evaluation.EvaluationWithheld` when nothing may be released (evaluation off,
    no new trained round, budget): see ``clients/private_evaluation.py``.
    """
    config = institution.config
    settings = evaluation_settings(config, policy=institution.policy)
    store = StateStore(
        institution.state_dir, run_id=config.federation.identity(run_id), accountant=config.privacy.accountant
    )
    state = store.load(context_state)
    data = load_data(institution)
    model = _build_model(institution, data, state)
    load_shared_arrays(model, encoder, mode=config.transfer.mode)
    return private_evaluation(
        institution,
        settings,
        model=model,
        data=data,
        state=state,
        store=store,
        context_state=context_state,
        server_round=server_round,
    )
