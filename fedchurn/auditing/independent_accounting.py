"""A second, independent accountant: Google's dp-accounting (PLD and RDP). Never imports Opacus.

Used to check the ε Opacus reports (``shared/privacy_accounting.py``) and as the ``pld`` accountant of
``fedchurn privacy epsilon|plan``. PLD (privacy loss distributions, pessimistic discretisation) gives the
tightest valid ε of the three; RDP is looser; Opacus' PRV lies within its stated error above PLD.

A history is a sequence of ``(noise_multiplier, sample_rate, steps)``: Poisson-subsampled Gaussian steps, per
customer row, add/remove adjacency — the DP-SGD mechanism of every institution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

from fedchurn.shared.errors import PrivacyError

__all__ = ["gaussian_epsilon", "pld_epsilon", "pld_noise_multiplier_for", "rdp_epsilon"]

History = Sequence[tuple[float, float, int]]

_MAX_NOISE_MULTIPLIER = 1.0e4


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs (through absl) every RDP order it drops; the bound stays valid without them."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check(history: History, delta: float) -> tuple[tuple[float, float, int], ...]:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta = {delta!r}: must be a number in (0, 1)")
    clean = []
    for sigma, q, steps in history:
        if not math.isfinite(sigma) or sigma < 0:
            raise PrivacyError(f"noise_multiplier = {sigma!r}: must be a finite number >= 0")
        if not 0.0 < q <= 1.0:
            raise PrivacyError(f"sample_rate = {q!r}: must be in (0, 1]")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise PrivacyError(f"steps = {steps!r}: must be a whole number >= 1")
        clean.append((float(sigma), float(q), int(steps)))
    return tuple(clean)


def _event(history: tuple[tuple[float, float, int], ...]):  # type: ignore[no-untyped-def]
    from dp_accounting import dp_event

    parts = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history
    ]
    return parts[0] if len(parts) == 1 else dp_event.ComposedDpEvent(parts)


@functools.lru_cache(maxsize=256)
def _pld(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()  # defaults: pessimistic, discretisation 1e-4
    accountant.compose(_event(history))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _rdp(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_event(history))
    return float(accountant.get_epsilon(delta))


def pld_epsilon(history: History, *, delta: float) -> float:
    """ε of the history by dp-accounting's PLD accountant (0.0 for no steps, inf for σ = 0)."""
    return _composed(history, delta, _pld)


def rdp_epsilon(history: History, *, delta: float) -> float:
    """ε of the history by dp-accounting's RDP accountant (its own order grid and conversion)."""
    return _composed(history, delta, _rdp)


def _composed(history: History, delta: float, accountant: Callable[[History, float], float]) -> float:
    clean = _check(history, delta)
    if not clean:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in clean):
        return math.inf
    with _quiet():
        return accountant(clean, float(delta))


def gaussian_epsilon(noise_multipliers: Sequence[float], *, delta: float) -> float:
    """ε of composed Gaussian mechanisms without sampling (σ_t relative to the sensitivity), by PLD."""
    return pld_epsilon([(float(sigma), 1.0, 1) for sigma in noise_multipliers], delta=delta)


def pld_noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to 0.5% of ``target_epsilon``) whose PLD ε over ``steps`` steps at rate q is <= target."""
    if not isinstance(target_epsilon, (int, float)) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon = {target_epsilon!r}: must be a finite number > 0")
    _check([(1.0, sample_rate, steps)], delta)

    def eps(sigma: float) -> float:
        return pld_epsilon([(sigma, sample_rate, steps)], delta=delta)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > _MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target_epsilon = {target_epsilon:g} cannot be reached with {steps} steps at sample rate "
                f"{sample_rate:.4g} and delta = {delta:g}: it would need a noise multiplier above "
                f"{_MAX_NOISE_MULTIPLIER:g}"
            )
    while True:
        middle = (low + high) / 2
        value = eps(high)
        if target_epsilon - value <= 0.005 * target_epsilon or high - low < 1e-6:
            return high
        if eps(middle) > target_epsilon:
            low = middle
        else:
            high = middle
