"""One institution's round in the configured transfer mode: its DP phases, composed in one privacy history.

fedrep trains the head (encoder fixed), then the encoder (head fixed). Both phases are DP-SGD over the same
rows, so the second continues the first's accountant history: ε covers both, as it covers every round.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedchurn.clients.training import TrainReport, train_locally
from fedchurn.shared.bank_random import derive_seed64
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.model import ChurnModel
from fedchurn.shared.privacy_accounting import AccountantState
from fedchurn.shared.transfer import round_phases


def train_round_phases(
    model: ChurnModel,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    config: FedChurnConfig,
    accountant: AccountantState,
    noise_multiplier: float,
    proximal_mu: float,
    seed: int,
) -> TrainReport:
    """Run every phase of one round in order; the report covers them all (steps summed, final history and ε).

    ``seed`` seeds the noise and the Poisson batches: a fresh secret one per call at a bank (shared/bank_random).
    """
    phases = round_phases(config.transfer, local_epochs=config.training.local_epochs)
    reports: list[TrainReport] = []
    for index, phase in enumerate(phases):
        report = train_locally(
            model,
            x_train,
            y_train,
            training=dataclasses.replace(config.training, local_epochs=phase.epochs),
            privacy=config.privacy,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
            proximal_mu=proximal_mu if phase.parts != "head" else 0.0,  # the proximal pull acts on the encoder
            seed=seed if len(phases) == 1 else derive_seed64(seed, "phase", index),  # secret if seed is
            parts=phase.parts,
        )
        accountant = report.accountant
        reports.append(report)
    if len(reports) == 1:
        return reports[0]
    losses = [(r.loss, r.steps) for r in reports if math.isfinite(r.loss)]
    loss = sum(value * steps for value, steps in losses) / max(sum(s for _, s in losses), 1) if losses else math.nan
    last = reports[-1]
    return dataclasses.replace(last, loss=float(loss), steps=sum(r.steps for r in reports))
