"""Local fine-tuning at one institution: the head always, the encoder when configured, DP-SGD when enabled."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedchurn.clients.private_training import make_private
from fedchurn.shared.config import PrivacyConfig, TrainingConfig
from fedchurn.shared.model import ChurnModel
from fedchurn.shared.privacy_accounting import AccountantState, epsilon_of, sample_rate_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    n_train: int
    loss: float  # mean training loss over the round's batches
    noise_multiplier: float  # 0.0 without DP
    sample_rate: float
    steps: int  # optimizer steps this round
    accountant: AccountantState  # cumulative history, this round included
    epsilon: float  # cumulative over all rounds so far; inf without DP
    delta: float


def steps_per_round(*, n_train: int, batch_size: int, local_epochs: int) -> int:
    """Optimizer steps one round takes (Opacus's Poisson loader keeps the plain loader's batch count)."""
    return local_epochs * math.ceil(n_train / batch_size)


def train_locally(
    model: ChurnModel,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    accountant: AccountantState,
    noise_multiplier: float,
    proximal_mu: float = 0.0,
    seed: int,
    parts: Literal["all", "head", "encoder"] = "all",
) -> TrainReport:
    """One round of local training. ``model`` is trained in place (its unwrapped parameters).

    ``parts`` says which parameters learn (the transfer mode's phases, clients/transfer.py); the others are fixed.
    """
    torch.manual_seed(seed)  # dropout; sampling and noise use `generator` below
    n_train = len(y_train)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(parts in ("all", "encoder"))
    for parameter in model.head.parameters():
        parameter.requires_grad_(parts in ("all", "head"))
    global_encoder = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if training.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=training.learning_rate, momentum=training.momentum)
    else:
        optimizer = torch.optim.Adam(trainable, lr=training.learning_rate)
    device = next(model.parameters()).device  # cuda when the institution was given a GPU
    dataset = TensorDataset(torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=generator)
    sample_rate = sample_rate_for(dataset_size=n_train, batch_size=training.batch_size)

    module: nn.Module = model
    if privacy.enabled:
        private = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            clipping_norm=privacy.clipping_norm,
            state=accountant,
            generator=generator,
            implementation=privacy.implementation,
        )
        module, optimizer, loader = private.module, private.optimizer, private.data_loader

    module.train()
    with warnings.catch_warnings():
        # Opacus' per-sample hooks fire on a first layer whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses, steps = _run_epochs(
            module,
            optimizer,
            loader,
            epochs=training.local_epochs,
            proximal=(model, global_encoder, training.learning_rate, proximal_mu) if proximal_mu > 0 else None,
        )

    if privacy.enabled:
        history = private.finish()
        epsilon = epsilon_of(history, delta=privacy.delta)
    else:
        history = accountant
        epsilon = math.inf
    return TrainReport(
        n_train=n_train,
        loss=float(np.mean(losses)) if losses else float("nan"),
        noise_multiplier=noise_multiplier if privacy.enabled else 0.0,
        sample_rate=sample_rate,
        steps=steps,
        accountant=history,
        epsilon=epsilon,
        delta=privacy.delta if privacy.enabled else 0.0,
    )


def _run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    epochs: int,
    proximal: tuple[ChurnModel, Mapping[str, torch.Tensor], float, float] | None,
) -> tuple[list[float], int]:
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = module(xb)
            if len(yb) == 0:
                # Poisson sampling can draw an empty batch. The step still runs (noise only), so the
                # accountant's step count matches the mechanism; a mean over no rows would be NaN.
                (logits.sum() * 0.0).backward()
            else:
                loss = loss_fn(logits, yb)
                loss.backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            steps += 1
            if proximal is not None:
                model, global_encoder, lr, mu = proximal
                _proximal_step(model, global_encoder, lr=lr, mu=mu)
    return losses, steps


@torch.no_grad()
def _proximal_step(model: ChurnModel, global_encoder: Mapping[str, torch.Tensor], *, lr: float, mu: float) -> None:
    """FedProx's pull towards the global encoder, as a separate data-free step.

    Inside the DP loss its gradient would be dropped (Opacus rebuilds gradients from per-sample terms); applied
    here it touches no customer data, so the DP guarantee of the step before is unchanged.
    """
    for name, parameter in model.encoder.named_parameters():
        parameter.sub_(lr * mu * (parameter - global_encoder[name]))
