"""`fedchurn audit --empirical`: one canary training run of a bank through its real training code path.

m canary customers are each added to the bank's training rows with probability 1/2, from a secure random source.
The bank then trains ``config.rounds`` rounds exactly as in a federation with itself as the only member:
``train_round_phases`` (its DP-SGD implementation, σ resolved as the bank resolves it, Poisson q and steps from its
training-set size), the encoder it sends being the one it receives next round.

The canaries: the bank's features have few dimensions (28 in the demo), so canaries placed among them interfere with
one another and with the data, and a one-run audit learns little. As in the paper's white-box ("Dirac") canaries,
each canary here gets an input coordinate of its own: the model input is the bank's features plus m canary
coordinates, zero for every customer; canary i is a blank customer (all features at the declared midpoint) with 1
in coordinate i and a random label. DP-SGD's guarantee holds for ANY row and any input width (clipping bounds each
row's gradient whatever its features), so this audits the same mechanism with the most visible canaries.

Two attackers score every canary (higher: more likely trained on):

- **black-box**: minus the final model's loss on the canary;
- **white-box**: what the server sees, the encoder update of every round: minus the inner product of the canary's
  clipped gradient (at the round's starting model, on its own coordinate's first-layer weights) with that round's
  update of those weights (an included canary's gradient is in the update; DP-SGD's clipping and noise bound how
  visible it is).

Each score becomes an ε lower bound at confidence 1 − β with the one-run theorem (fedchurn/auditing/empirical.py), set
beside the ε the bank's accountant claims for this same run (its n, q, steps).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedchurn.auditing.empirical import Guesses, epsilon_lower_bound, guess
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.training import steps_per_round
from fedchurn.clients.transfer import train_round_phases
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.model import ChurnModel, build_model
from fedchurn.shared.privacy_accounting import AccountantState, resolve_noise_multiplier, sample_rate_for
from fedchurn.shared.transfer import epochs_per_round

logger = logging.getLogger(__name__)

__all__ = ["EmpiricalAudit", "run_empirical_audit"]


@dataclass(frozen=True)
class EmpiricalAudit:
    institution: str
    dp_enabled: bool
    claimed_epsilon: float  # the bank's accountant, for this run's n, q, steps (inf without DP)
    delta: float
    beta: float  # the lower bounds hold with confidence 1 − β
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    n_train: int  # the bank's rows (canaries excluded)
    canaries_included: int
    black_box: Guesses
    white_box: Guesses
    black_box_epsilon: float  # the lower bounds
    white_box_epsilon: float

    @property
    def epsilon_lower_bound(self) -> float:
        return max(self.black_box_epsilon, self.white_box_epsilon)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        d["epsilon_lower_bound"] = self.epsilon_lower_bound
        d["method"] = "Steinke, Nasr & Jagielski 2023, one training run; add/remove one canary row"
        return d


def _canary_rows(m: int, n_features: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): m blank customers, canary i with 1 in its own coordinate ``n_features + i``; random labels."""
    x = np.zeros((m, n_features + m), dtype=np.float32)
    x[np.arange(m), n_features + np.arange(m)] = 1.0
    return x, rng.integers(0, 2, size=m).astype(np.float32)


def _first_layer(model: ChurnModel) -> str:
    return next(name for name, _ in model.named_parameters())  # the encoder's first Linear weight


def _canary_gradients(model: ChurnModel, x: np.ndarray, y: np.ndarray, *, clip: float, n_features: int) -> torch.Tensor:
    """(m, hidden): canary i's gradient on the first-layer weights of its own coordinate, scaled as DP-SGD clips it
    (by the norm over ALL parameters)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    model.eval()
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.from_numpy(x), torch.from_numpy(y))
    m = len(x)
    norms = torch.cat([grads[k].reshape(m, -1) for k in params], dim=1).norm(dim=1)
    scale = torch.clamp(clip / (norms + 1e-12), max=1.0)
    own = grads[_first_layer(model)][torch.arange(m), :, n_features + torch.arange(m)]  # (m, hidden)
    return own * scale[:, None]


def _losses(model: ChurnModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        return nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y), reduction="none").numpy()


def run_empirical_audit(
    config: FedChurnConfig,
    institution: str,
    *,
    canaries: int = 1000,
    guess_fraction: float = 0.1,
    beta: float = 0.05,
) -> EmpiricalAudit:
    """One canary run of ``institution`` under ``config`` (see the module docstring).

    ``guess_fraction`` of the canaries are guessed "included" (highest scores) and as many "excluded" (lowest).
    """
    if canaries < 10 or not 0 < guess_fraction <= 0.5:
        raise ValueError("need at least 10 canaries and 0 < guess_fraction <= 0.5")
    rng = np.random.default_rng(secrets.randbits(128))  # canaries and inclusion: independent of anything in config
    data = prepare_institution(config, institution)
    d = len(data.feature_names)
    x_canary, y_canary = _canary_rows(canaries, d, rng)
    included = rng.random(canaries) < 0.5
    x_data = np.concatenate([data.x_train, np.zeros((len(data.y_train), canaries), dtype=np.float32)], axis=1)
    x_train = np.concatenate([x_data, x_canary[included]])
    y_train = np.concatenate([data.y_train, y_canary[included]])
    n = len(y_train)

    torch.manual_seed(secrets.randbits(63))
    model = build_model(config.model, input_dim=d + canaries)
    privacy = config.privacy
    batch = config.training.batch_size
    q = sample_rate_for(dataset_size=n, batch_size=batch)
    per_round = steps_per_round(n_train=n, batch_size=batch, local_epochs=epochs_per_round(config))
    sigma = (
        resolve_noise_multiplier(privacy, sample_rate=q, total_steps=per_round * config.rounds)
        if privacy.enabled
        else 0.0
    )
    accountant = AccountantState(accountant=privacy.accountant, history=())
    first = _first_layer(model)
    white = np.zeros(canaries)
    epsilon, steps = math.inf, 0
    for _ in range(config.rounds):
        start = dict(model.named_parameters())[first].detach().clone()
        g = _canary_gradients(model, x_canary, y_canary, clip=privacy.clipping_norm, n_features=d)
        report = train_round_phases(
            model,
            x_train,
            y_train,
            config=config,
            accountant=accountant,
            noise_multiplier=sigma,
            proximal_mu=0.0,
            seed=secrets.randbits(63),
        )
        accountant, steps = report.accountant, steps + report.steps
        epsilon = report.epsilon if privacy.enabled else math.inf
        update = (dict(model.named_parameters())[first].detach() - start)[:, d:]  # (hidden, m): what the server sees
        white += (-(g * update.T).sum(dim=1)).double().numpy()  # descent: an included canary's gradient opposes it
    black = -_losses(model, x_canary, y_canary)
    k = max(1, int(guess_fraction * canaries))
    black_guess = guess(black, included, k_positive=k, k_negative=k)
    white_guess = guess(white, included, k_positive=k, k_negative=k)
    delta = privacy.delta  # the δ the bank claims; also tested with DP off, for comparable figures

    def bound(g: Guesses) -> float:
        return epsilon_lower_bound(m=g.m, r=g.r, v=g.v, delta=delta, beta=beta)

    result = EmpiricalAudit(
        institution=institution,
        dp_enabled=privacy.enabled,
        claimed_epsilon=epsilon,
        delta=delta,
        beta=beta,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        rounds=config.rounds,
        n_train=len(data.y_train),
        canaries_included=int(included.sum()),
        black_box=black_guess,
        white_box=white_guess,
        black_box_epsilon=bound(black_guess),
        white_box_epsilon=bound(white_guess),
    )
    logger.info(
        "%s: empirical ε ≥ %.3f (black-box %d/%d, white-box %d/%d correct), claimed ε %.3f",
        institution,
        result.epsilon_lower_bound,
        black_guess.v,
        black_guess.r,
        white_guess.v,
        white_guess.r,
        epsilon,
    )
    return result
