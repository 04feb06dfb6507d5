"""Choosing DP-SGD hyper-parameters for a target ε, from the number of rows alone.

DP-SGD on a small table is a trade between three things the target ε ties together: the expected batch size
(sample rate q = B / n), the number of steps (epochs x n / B) and the noise multiplier σ. For a fixed ε and a
fixed number of epochs, σ grows roughly like sqrt(q), so the noise on the averaged gradient, σ C / B, shrinks
like 1 / sqrt(B): larger batches are better, until there are too few steps left to learn. The DP-SGD literature
(Abadi et al. 2016; De et al. 2022; Ponomareva et al., "How to DP-fy ML", 2023) and Opacus' own guidance for
tabular data therefore recommend large batches, a fixed, modest number of epochs, σ then derived from the target
ε, a clipping bound near the typical per-example gradient norm, and an adaptive optimiser (Adam) whose step
size does not depend on the clipping bound.

This module turns that into a rule:

- expected batch B = clamp(round(BATCH_PER_SQRT_ROW x sqrt(n)), MIN_BATCH, MAX_BATCH), and never more than n / 4
  (a sqrt-n batch keeps both q and the steps per epoch growing with the bank's size);
- TOTAL_EPOCHS passes over the rows for the whole run, spread over the rounds (``training.local_epochs``);
- σ: the smallest noise multiplier whose ε over all those steps is at most the target (the accountant's);
- Adam at LEARNING_RATE, clipping bound CLIPPING_NORM (measured on the public BankChurners and Telco tables and
  on the synthetic consortium, all at ε = 3: see the README).

Privacy: the plan reads n and public settings, never a row, so choosing it costs no ε. n itself is the bank's
own: a bank plans at home; the server never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.privacy_accounting import noise_multiplier_for, sample_rate_for

logger = logging.getLogger(__name__)

BATCH_PER_SQRT_ROW = 2.0
MIN_BATCH = 32
MAX_BATCH = 1024
TOTAL_EPOCHS = 20
LEARNING_RATE = 0.01
CLIPPING_NORM = 0.5
OPTIMIZER: Literal["adam"] = "adam"
MAX_USEFUL_SIGMA = 20.0  # beyond this the averaged gradient is mostly noise at these sizes: refuse the plan


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD settings for one institution of ``n_train`` training rows, for the whole run."""

    n_train: int
    batch_size: int  # expected batch size
    sample_rate: float  # Poisson sample rate q (Opacus': 1 / ceil(n / B))
    local_epochs: int  # per round (per phase)
    epochs_per_round: int  # every DP phase of a round together (fedrep: head + encoder epochs)
    rounds: int
    total_steps: int
    noise_multiplier: float  # σ
    clipping_norm: float  # C
    learning_rate: float
    optimizer: str
    target_epsilon: float
    delta: float

    @property
    def noise_per_step(self) -> float:
        """Standard deviation of the noise on one step's averaged clipped gradient, σ C / B."""
        return self.noise_multiplier * self.clipping_norm / self.batch_size


def planned_batch_size(n_train: int) -> int:
    """The expected batch size for ``n_train`` rows: about 2 sqrt(n), within [32, 1024] and at most n / 4."""
    if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 1:
        raise ConfigError("n_train", n_train, "must be a whole number of training rows >= 1")
    batch = round(BATCH_PER_SQRT_ROW * math.sqrt(n_train))
    batch = min(max(batch, MIN_BATCH), MAX_BATCH)
    return max(1, min(batch, n_train // 4))


def planned_local_epochs(*, rounds: int) -> int:
    """Epochs per round so that the run makes about TOTAL_EPOCHS passes (at least one per round)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError("rounds", rounds, "must be a whole number >= 1")
    return max(1, round(TOTAL_EPOCHS / rounds))


def plan_dp(
    *,
    n_train: int,
    target_epsilon: float,
    delta: float,
    rounds: int,
    extra_epochs_per_round: int = 0,
    accountant: str = "rdp",
) -> DPPlan:
    """The plan for one institution. ``extra_epochs_per_round``: DP epochs a mode adds per round (fedrep's head).

    Raises ``ConfigError`` when the target cannot be met with a useful amount of noise, naming what to change.
    """
    batch = planned_batch_size(n_train)
    local_epochs = planned_local_epochs(rounds=rounds)
    epochs_per_round = local_epochs + extra_epochs_per_round
    steps = rounds * epochs_per_round * math.ceil(n_train / batch)
    q = sample_rate_for(dataset_size=n_train, batch_size=batch)
    sigma = noise_multiplier_for(
        target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
    )
    if sigma > MAX_USEFUL_SIGMA:
        raise ConfigError(
            "privacy.target_epsilon",
            target_epsilon,
            f"with {n_train} training rows, {rounds} rounds and batch {batch} this needs σ = {sigma:.1f}: "
            "the model would learn almost nothing",
            "raise the target ε, or train fewer rounds",
        )
    return DPPlan(
        n_train=n_train,
        batch_size=batch,
        sample_rate=q,
        local_epochs=local_epochs,
        epochs_per_round=epochs_per_round,
        rounds=rounds,
        total_steps=steps,
        noise_multiplier=sigma,
        clipping_norm=CLIPPING_NORM,
        learning_rate=LEARNING_RATE,
        optimizer=OPTIMIZER,
        target_epsilon=target_epsilon,
        delta=delta,
    )


def plan_config(config: FedChurnConfig, *, n_train: int, extra_epochs_per_round: int = 0) -> FedChurnConfig:
    """``config`` with the planned training settings for an institution of ``n_train`` rows.

    Keeps ``privacy.target_epsilon`` (σ is then derived where the steps are known, as always); needs it set.
    """
    privacy = config.privacy
    if not privacy.enabled or privacy.target_epsilon is None:
        raise ConfigError(
            "privacy.target_epsilon",
            privacy.target_epsilon,
            "planning DP training needs a target ε (and privacy.enabled = true)",
            "set privacy.target_epsilon, e.g. 3, and privacy.noise_multiplier = null",
        )
    plan = plan_dp(
        n_train=n_train,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        rounds=config.rounds,
        extra_epochs_per_round=extra_epochs_per_round,
        accountant=privacy.accountant,
    )
    training = dataclasses.replace(
        config.training,
        batch_size=plan.batch_size,
        local_epochs=plan.local_epochs,
        learning_rate=plan.learning_rate,
        optimizer=OPTIMIZER,
    )
    return dataclasses.replace(
        config, training=training, privacy=dataclasses.replace(privacy, clipping_norm=plan.clipping_norm)
    )


def plan_consortium(config: FedChurnConfig, *, sizes: list[int]) -> FedChurnConfig:
    """One config for institutions of these sizes (a simulation holds every bank's rows; a federation's config is
    shared): planned for the median size. Each institution still derives its own σ from its own n and steps."""
    if not sizes:
        raise ConfigError("data", "no institutions", "planning needs at least one institution's row count")
    ordered = sorted(sizes)
    median = ordered[(len(ordered) - 1) // 2]
    return plan_config(config, n_train=median)


def plans_at_the_bank(config: FedChurnConfig) -> bool:
    """Whether a bank replaces the config's training settings by its own plan (``training.plan: auto`` with DP
    and a target ε; a fixed σ or no DP leaves the settings as given)."""
    privacy = config.privacy
    return config.training.plan == "auto" and privacy.enabled and privacy.target_epsilon is not None


def bank_training_config(config: FedChurnConfig, *, n_train: int) -> FedChurnConfig:
    """The config a bank of ``n_train`` training rows trains with: its own plan (``plan_config``) where
    ``plans_at_the_bank``, else ``config`` unchanged.

    n is the bank's own and never leaves it: the server sends one config, each bank plans at home. When no useful
    plan exists (σ above MAX_USEFUL_SIGMA), the config's own settings are kept and logged: σ is still derived
    from the target ε, and the bank declines the round if no σ can meet it.
    """
    if not plans_at_the_bank(config):
        return config
    try:
        return plan_config(config, n_train=n_train)
    except ConfigError as exc:
        logger.warning("no useful DP plan for %d training rows (%s): training with the config's settings", n_train, exc)
        return config
