"""Privacy accounting that composes across federated rounds: the history an institution keeps, and its ε.

Each institution keeps an :class:`AccountantState` (the composition history: noise multiplier, sample rate and
step count of every stretch of training) on its own disk. The ε reported after round k is the ε of all k rounds
together: neither the per-round ε (what a new engine per round reports, as Flower's Opacus example does) nor the
sum of per-round ε (a valid but very loose bound). The guarantee is per customer row, add/remove adjacency, and
assumes Poisson sampling (each row joins each batch independently with probability q).

Besides the DP-SGD training module (clients/private_training.py), this is the only module that imports Opacus: its
accountants (RDP, PRV) and its σ search, nothing of its training engine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size
from opacus.accountants.utils import get_noise_multiplier

from fedchurn.shared.config import PrivacyConfig
from fedchurn.shared.errors import PrivacyError

logger = logging.getLogger(__name__)

# Opacus calls logging.basicConfig when imported (opacus/utils/module_utils.py): on a root logger with no handler
# yet, that adds one, and every record of a library with its own console handler (Flower's) is then printed twice.
# Logging is configured by the program (the CLI, Flower's processes), never by an import: drop that handler.
_OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
for _handler in list(logging.root.handlers):
    if _handler.formatter is not None and _handler.formatter._fmt == _OPACUS_ROOT_FORMAT:
        logging.root.removeHandler(_handler)

__all__ = [
    "ACCOUNTANTS",
    "AccountantState",
    "MechanismStep",
    "check_delta",
    "compute_epsilon",
    "epsilon_of",
    "noise_multiplier_after",
    "noise_multiplier_for",
    "resolve_noise_multiplier",
    "sample_rate_for",
]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# Opacus' PRV accountant discretises the privacy loss on a grid whose size grows with ε and the step count; at
# extreme ε (σ far too small) it needs billions of points and gets the process killed. Above this many points we
# report the RDP bound instead: also a valid upper bound, and ε is meaninglessly large there anyway.
_PRV_MAX_GRID_POINTS = 10_000_000
_PRV_EPS_ERROR = 0.01  # Opacus' default; its PRV result is an upper bound that includes this error
_MAX_NOISE_MULTIPLIER = 1.0e6  # opacus.accountants.utils.MAX_SIGMA: get_noise_multiplier gives up above this

_STATE_HINT = (
    "the stored accountant state is damaged: restore it from the institution's backup; never reset it, "
    "that would forget privacy already spent"
)


# --------------------------------------------------------------------------------------------------
# Accountant state: the composition history an institution keeps between rounds
# --------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_accountant(accountant: Any) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` DP-SGD steps with noise multiplier σ and Poisson sample rate q: one entry of the history."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        # σ = 0 is recorded truthfully (it gives ε = inf); anything else malformed is refused.
        if not _is_number(self.noise_multiplier) or not math.isfinite(self.noise_multiplier):
            raise PrivacyError(f"noise_multiplier = {self.noise_multiplier!r}: must be a finite number >= 0")
        if self.noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier = {self.noise_multiplier!r}: must be >= 0")
        if not _is_number(self.sample_rate) or not 0.0 < self.sample_rate <= 1.0:
            raise PrivacyError(f"sample_rate = {self.sample_rate!r}: must be in (0, 1] (expected batch size / rows)")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise PrivacyError(f"steps = {self.steps!r}: must be a whole number >= 1")
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))


@dataclass(frozen=True)
class AccountantState:
    """An institution's privacy history: stored on its disk (JSON via ``to_dict``) and restored every round."""

    accountant: str  # "rdp" | "prv": how ε is computed from the history
    history: tuple[MechanismStep, ...] = ()

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        if isinstance(self.history, list):  # a list is a natural slip; the state stays hashable either way
            object.__setattr__(self, "history", tuple(self.history))
        if not isinstance(self.history, tuple) or not all(isinstance(s, MechanismStep) for s in self.history):
            raise PrivacyError("AccountantState.history must be a tuple of MechanismStep")

    @property
    def total_steps(self) -> int:
        """DP-SGD steps taken over the whole history."""
        return sum(step.steps for step in self.history)

    def with_steps(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> AccountantState:
        """This history followed by ``steps`` more steps; merged into the last entry when σ and q are equal."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise PrivacyError(f"steps = {steps!r}: must be a whole number >= 0")
        if steps == 0:
            return self
        new = MechanismStep(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if self.history:
            last = self.history[-1]
            if last.noise_multiplier == new.noise_multiplier and last.sample_rate == new.sample_rate:
                merged = MechanismStep(
                    noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate, steps=last.steps + steps
                )
                return AccountantState(accountant=self.accountant, history=(*self.history[:-1], merged))
        return AccountantState(accountant=self.accountant, history=(*self.history, new))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``AccountantState.from_dict(s.to_dict()) == s`` (floats round-trip exactly)."""
        return {
            "accountant": self.accountant,
            "history": [
                {"noise_multiplier": s.noise_multiplier, "sample_rate": s.sample_rate, "steps": s.steps}
                for s in self.history
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccountantState:
        """Read what ``to_dict`` wrote, checking every field: a damaged state must fail loudly, never reset."""
        if not isinstance(d, Mapping):
            raise PrivacyError(f"accountant state must be a mapping, got {type(d).__name__}: {_STATE_HINT}")
        unknown = sorted(set(d) - {"accountant", "history"})
        if unknown or "accountant" not in d or "history" not in d:
            raise PrivacyError(
                f"accountant state must have exactly the keys 'accountant' and 'history', got {sorted(d)}: "
                f"{_STATE_HINT}"
            )
        accountant = d["accountant"]
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"accountant state: accountant = {accountant!r} is not one of {', '.join(ACCOUNTANTS)}: {_STATE_HINT}"
            )
        raw = d["history"]
        if not isinstance(raw, (list, tuple)):
            raise PrivacyError(f"accountant state: history must be a list, got {type(raw).__name__}: {_STATE_HINT}")
        steps: list[MechanismStep] = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping) or set(entry) != {"noise_multiplier", "sample_rate", "steps"}:
                raise PrivacyError(
                    f"accountant state: history[{i}] = {entry!r} must be a mapping with exactly "
                    f"noise_multiplier, sample_rate, steps: {_STATE_HINT}"
                )
            try:
                steps.append(
                    MechanismStep(
                        noise_multiplier=entry["noise_multiplier"],
                        sample_rate=entry["sample_rate"],
                        steps=entry["steps"],
                    )
                )
            except PrivacyError as exc:
                raise PrivacyError(f"accountant state: history[{i}].{exc}: {_STATE_HINT}") from None
        return cls(accountant=accountant, history=tuple(steps))


# --------------------------------------------------------------------------------------------------
# ε from a history
# --------------------------------------------------------------------------------------------------


def _check_delta_value(delta: Any) -> None:
    if not _is_number(delta) or not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta = {delta!r}: must be a number in (0, 1), typically well below 1/rows")


@contextlib.contextmanager
def _quiet_alpha_warnings() -> Any:
    """Opacus warns when the best RDP order is at the edge of its range: the bound stays valid, only a little
    looser, and binary searches over σ hit the edge on purpose. Keep it out of the logs of every worker."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def _prv_grid_points(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The grid size Opacus' PRV accountant will allocate (same formula as PRVAccountant._get_domain)."""
    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    half_width = compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=_PRV_EPS_ERROR, delta_error=delta_error
    )
    mesh = _PRV_EPS_ERROR / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return float(2 * half_width / mesh)


@functools.lru_cache(maxsize=512)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf  # no noise: no guarantee (Opacus' PRV would crash on it)
    if accountant == "prv":
        with _quiet_alpha_warnings():
            points = _prv_grid_points(history, delta)
        if points > _PRV_MAX_GRID_POINTS:
            rdp = _epsilon(history, delta, "rdp")
            logger.warning(
                "PRV accounting would need %.3g grid points (ε is very large); reporting the RDP bound ε = %.4g "
                "instead, also a valid upper bound. Raise the noise multiplier or train fewer steps.",
                points,
                rdp,
            )
            return rdp
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, q, steps) for sigma, q, steps in history]
    # PRV takes log(1 - q): a harmless -inf at q = 1
    with np.errstate(divide="ignore", invalid="ignore"), _quiet_alpha_warnings():
        eps = float(acc.get_epsilon(delta=delta))
    return eps


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus' RDP curve of one step at (q, σ), computed once: every round of a run usually repeats it, and ε is
    asked for after each round (and for every prefix of a ledger by the audit)."""
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Exactly Opacus' ``RDPAccountant.get_epsilon`` (same curves, steps, sum and conversion, so the same float),
    with each distinct (q, σ) curve computed once."""
    rdp = sum([_rdp_per_step(q, sigma) * steps for sigma, q, steps in history])
    with np.errstate(divide="ignore", invalid="ignore"), _quiet_alpha_warnings():
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _grouped(history: tuple[MechanismStep, ...]) -> tuple[tuple[float, float, int], ...]:
    """Entries with equal σ and q summed: composition is order-free, and PRV cost grows with distinct entries."""
    totals: dict[tuple[float, float], int] = {}
    for step in history:
        key = (step.noise_multiplier, step.sample_rate)
        totals[key] = totals.get(key, 0) + step.steps
    return tuple((sigma, q, steps) for (sigma, q), steps in totals.items())


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps (σ, q) at ``delta``. 0.0 for no steps, inf for σ = 0."""
    _check_accountant(accountant)
    _check_delta_value(delta)
    state = AccountantState(accountant=accountant).with_steps(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    return epsilon_of(state, delta=delta)


def epsilon_of(state: AccountantState, *, delta: float) -> float:
    """ε of the whole history in ``state``, composed with ``state.accountant`` (0.0 for an empty history)."""
    _check_delta_value(delta)
    return _epsilon(_grouped(state.history), float(delta), state.accountant)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (to 0.5% of ``target_epsilon``) whose ε over ``steps`` steps at rate q is <= the target."""
    _check_accountant(accountant)
    _check_delta_value(delta)
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon = {target_epsilon!r}: must be a finite number > 0")
    MechanismStep(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # checks q and steps
    try:
        with np.errstate(divide="ignore", invalid="ignore"), _quiet_alpha_warnings():
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005 * target_epsilon,  # Opacus' tolerance is absolute: make it relative
            )
    except ValueError:
        floor = ""
        if accountant == "rdp":
            floor = f" (RDP cannot certify ε below about {_epsilon(((1e6, sample_rate, steps),), delta, 'rdp'):.3g}"
            floor += " at this δ whatever σ is: try accountant 'prv')"
        raise PrivacyError(
            f"target_epsilon = {target_epsilon:g} cannot be reached with {steps} steps at sample rate "
            f"{sample_rate:.4g} and delta = {delta:g}: it would need a noise multiplier above "
            f"{_MAX_NOISE_MULTIPLIER:g}{floor}. Raise target_epsilon, train fewer rounds or local epochs, or use "
            "a smaller batch (lower sample rate)"
        ) from None
    return float(sigma)


def noise_multiplier_after(
    history: AccountantState, *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest σ (to 0.5% of the target) whose ``steps`` more steps at rate q keep the whole history's ε <= target.

    ``history`` is everything already spent on these rows (a bank's lifetime): the plan composes it with the new
    steps, so the target bounds the final lifetime ε, not the new steps alone. Raises :class:`PrivacyError` when
    the history alone already reaches the target (no σ can help).
    """
    _check_delta_value(delta)
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon = {target_epsilon!r}: must be a finite number > 0")
    MechanismStep(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # checks q and steps

    def epsilon(sigma: float) -> float:
        return epsilon_of(history.with_steps(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps), delta=delta)

    spent = epsilon_of(history, delta=delta)
    high = 1.0
    while spent >= target_epsilon or epsilon(high) > target_epsilon:
        high *= 2.0
        if spent >= target_epsilon or high > _MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target_epsilon = {target_epsilon:g} cannot be kept: ε already spent on these rows is {spent:.4g}, "
                f"and {steps} more steps at sample rate {sample_rate:.4g} exceed the target whatever σ is"
            )
    low = 0.0
    # Bisect until ε(high) is within 0.5% of the target; ε(high) <= target holds throughout.
    while high - low > 1e-6 * high and epsilon(high) < 0.995 * target_epsilon:
        middle = (low + high) / 2.0
        if epsilon(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def resolve_noise_multiplier(privacy: PrivacyConfig, *, sample_rate: float, total_steps: int) -> float:
    """σ for a run: ``privacy.noise_multiplier`` if set, else derived from ``privacy.target_epsilon``.

    ``total_steps`` must count the steps of the WHOLE run at this institution (rounds × local epochs × steps per
    epoch): the target is a budget for all rounds together, not per round.
    """
    if not privacy.enabled:
        raise PrivacyError("privacy is disabled (privacy.enabled = false): there is no noise multiplier to resolve")
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    if privacy.target_epsilon is None:  # PrivacyConfig refuses this; kept for configs built without checks
        raise PrivacyError("give privacy.noise_multiplier or privacy.target_epsilon")
    sigma = noise_multiplier_for(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=sample_rate,
        steps=total_steps,
        accountant=privacy.accountant,
    )
    if sigma > 100.0:  # the config's own upper bound for a given σ: training will be mostly noise
        logger.warning(
            "target_epsilon %.3g over %d steps needs noise multiplier %.4g: the model will learn little",
            privacy.target_epsilon,
            total_steps,
            sigma,
        )
    logger.info(
        "noise multiplier %.4f gives ε <= %.3g at δ = %.2g over %d steps (q = %.4g, %s)",
        sigma,
        privacy.target_epsilon,
        privacy.delta,
        total_steps,
        sample_rate,
        privacy.accountant,
    )
    return sigma


def check_delta(*, delta: float, dataset_size: int) -> None:
    """Refuse δ >= 1/n: then "publish one random customer's full row" would itself be (0, δ)-DP."""
    _check_delta_value(delta)
    if not isinstance(dataset_size, int) or isinstance(dataset_size, bool) or dataset_size < 1:
        raise PrivacyError(f"dataset_size = {dataset_size!r}: must be a whole number >= 1")
    if delta >= 1.0 / dataset_size:
        suggestion = 1.0 / (10 * dataset_size)
        raise PrivacyError(
            f"privacy.delta = {delta:g} is not below 1/n = {1.0 / dataset_size:.3g} for n = {dataset_size} training "
            "rows: a mechanism that publishes one customer's full row at random would satisfy such a guarantee. "
            f"Set privacy.delta to at most 1/(10 n), e.g. {suggestion:.1e}"
        )


def sample_rate_for(*, dataset_size: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus derives from ``DataLoader(batch_size=batch_size)``: 1 / ceil(n / B).

    Equal to B / n only when B divides n; use this to plan σ before the data loader exists.
    """
    for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PrivacyError(f"{name} = {value!r}: must be a whole number >= 1")
    return 1.0 / math.ceil(dataset_size / batch_size)
