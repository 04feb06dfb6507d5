"""The reference modes, in-process (no Flower, no Ray): ``local``, ``centralized``, ``logreg`` and ``hgb``.

- ``local``: each institution alone: the same model, the same seeded initial weights as a federation without a
  pretrained encoder (a bank that does not join has no consortium encoder), the same DP-SGD (σ, q, steps per
  round, rounds), so its ε equals a ``finetune`` federation's. Nothing leaves the institution.
- ``centralized``: every institution's training rows pooled (each preprocessed by its own preprocessor, as in
  the federation) and trained WITHOUT differential privacy: not private, pooled; never a deployment.
- ``logreg`` / ``hgb``: each institution's own training rows, scikit-learn logistic regression and
  histogram gradient-boosted trees, WITHOUT differential privacy: what a bank's analysts would fit today.

Both evaluate on each institution's own test rows, from the same splits as every federated mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedchurn.clients.evaluation import evaluate
from fedchurn.clients.prepared_institution import PreparedInstitution, prepare_institution
from fedchurn.clients.training import steps_per_round, train_locally
from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.dp_planning import bank_training_config
from fedchurn.shared.model import ChurnModel, build_model, encoder_arrays, load_encoder_arrays
from fedchurn.shared.privacy_accounting import AccountantState, check_delta, resolve_noise_multiplier, sample_rate_for


def fresh_model(config: FedChurnConfig, *, input_dim: int) -> ChurnModel:
    """The federation's round-1 model without a checkpoint: seeded encoder (server) and seeded head (clients)."""
    torch.manual_seed(derive_seed(config.seed, "encoder"))
    encoder = encoder_arrays(build_model(config.model, input_dim=input_dim))
    torch.manual_seed(derive_seed(config.seed, "head"))
    model = build_model(config.model, input_dim=input_dim)
    load_encoder_arrays(model, encoder)
    return model


def _result(model: ChurnModel, data: PreparedInstitution, *, epsilon: float) -> dict[str, Any]:
    test = evaluate(model, data.x_test, data.y_test)
    return {
        "auc": test["auc"],
        "pr_auc": test["pr_auc"],
        "brier": test["brier"],
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
    }


def run_local(config: FedChurnConfig, institutions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each institution trains alone for ``rounds`` x ``local_epochs`` epochs of DP-SGD (as in a federation)."""
    results: dict[str, dict[str, Any]] = {}
    for name in institutions:
        data = prepare_institution(config, name)
        model, epsilon = train_local_model(config, data)
        results[name] = _result(model, data, epsilon=epsilon)
    return results


def train_local_model(config: FedChurnConfig, data: PreparedInstitution) -> tuple[ChurnModel, float]:
    """One institution's own DP model alone, with its own plan (as in a federation), and its ε (inf without DP)."""
    n_train = len(data.y_train)
    config = bank_training_config(config, n_train=n_train)
    model = fresh_model(config, input_dim=len(data.feature_names))
    accountant = AccountantState(accountant=config.privacy.accountant)
    sigma = 0.0
    if config.privacy.enabled:
        check_delta(delta=config.privacy.delta, dataset_size=n_train)
        per_round = steps_per_round(
            n_train=n_train, batch_size=config.training.batch_size, local_epochs=config.training.local_epochs
        )
        sigma = resolve_noise_multiplier(
            config.privacy,
            sample_rate=sample_rate_for(dataset_size=n_train, batch_size=config.training.batch_size),
            total_steps=per_round * config.rounds,
        )
    epsilon = math.inf
    for server_round in range(1, config.rounds + 1):
        report = train_locally(
            model,
            data.x_train,
            data.y_train,
            training=config.training,
            privacy=config.privacy,
            accountant=accountant,
            noise_multiplier=sigma,
            seed=derive_seed(config.seed, data.name, server_round, "train"),
        )
        accountant, epsilon = report.accountant, report.epsilon
    return model, epsilon


def run_centralized(config: FedChurnConfig, institutions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """All training rows pooled, no DP (ε reported as None): not private, pooled."""
    prepared = [prepare_institution(config, name) for name in institutions]
    x = np.concatenate([p.x_train for p in prepared])
    y = np.concatenate([p.y_train for p in prepared])
    model = fresh_model(config, input_dim=x.shape[1])
    no_dp = dataclasses.replace(config.privacy, enabled=False)
    accountant = AccountantState(accountant=config.privacy.accountant)
    for server_round in range(1, config.rounds + 1):
        train_locally(
            model,
            x,
            y,
            training=config.training,
            privacy=no_dp,
            accountant=accountant,
            noise_multiplier=0.0,
            seed=derive_seed(config.seed, "centralized", server_round, "train"),
        )
    return {p.name: _result(model, p, epsilon=math.inf) for p in prepared}


def run_sklearn(config: FedChurnConfig, institutions: Sequence[str], *, kind: str) -> dict[str, dict[str, Any]]:
    """Each institution's own non-private scikit-learn model (``logreg`` or ``hgb``) on the same splits."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from fedchurn.clients.metrics import brier_score, pr_auc, roc_auc

    results: dict[str, dict[str, Any]] = {}
    for name in institutions:
        data = prepare_institution(config, name)
        seed = derive_seed(config.seed, name, kind) % 2**31
        estimator: Any
        if kind == "logreg":
            estimator = LogisticRegression(max_iter=5000)
        elif kind == "hgb":
            estimator = HistGradientBoostingClassifier(random_state=seed)
        else:
            raise ValueError(f"unknown scikit-learn baseline {kind!r}: logreg or hgb")
        estimator.fit(data.x_train, data.y_train)
        scores = estimator.predict_proba(data.x_test)[:, 1]
        results[name] = {
            "auc": roc_auc(data.y_test, scores),
            "pr_auc": pr_auc(data.y_test, scores),
            "brier": brier_score(data.y_test, scores),
            "epsilon": None,
            "n_train": len(data.y_train),
            "n_test": len(data.y_test),
        }
    return results
