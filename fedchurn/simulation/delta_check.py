"""Before a simulation starts: refuse a δ that is not below 1/n for some bank's n training rows.

Each bank checks this itself before it trains (``clients/institution.py``) and, in a real federation, declines
with a fixed code that carries neither n nor any message. In a simulation the one who runs it holds every bank's
rows, so the plan can say up front which bank breaks the rule, with its n and 1/n, instead of a run in which that
bank declines every round. The split here is the reproducible one (the bank's own, keyed by its secret, differs
by a few rows), so n is the bank's training rows to within a few.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.splits import UnbalancedSplitError
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import ConfigError

logger = logging.getLogger(__name__)


def training_rows(config: FedChurnConfig, names: Sequence[str], known: Mapping[str, int]) -> dict[str, int]:
    """Each bank's training rows: ``known`` where given, else from its prepared data (a bank whose split lacks a
    class is left out: the run reports it)."""
    sizes = dict(known)
    for name in names:
        if name not in sizes:
            try:
                sizes[name] = len(prepare_institution(config, name).y_train)
            except UnbalancedSplitError:
                continue
    return sizes


def check_delta_for_rows(config: FedChurnConfig, sizes: Mapping[str, int]) -> None:
    """Raise a ConfigError when δ >= 1/n for some bank, naming the one with the most training rows (the smallest
    1/n, so the rule is hardest to meet there); warn when δ is below every 1/n but not well below (> 1/(10 n))."""
    if not config.privacy.enabled or not sizes:
        return
    delta = config.privacy.delta
    name, n = max(sizes.items(), key=lambda item: (item[1], item[0]))
    if n >= 1 and delta < 1.0 / n:
        if delta > 0.1 / n:
            logger.warning(
                "privacy.delta = %g is below 1/n but not well below it for %s (n = %d training rows, 1/n = %.3g): "
                "prefer at most 1/(10 n) = %.1e",
                delta,
                name,
                n,
                1.0 / n,
                0.1 / n,
            )
        return
    bound = 1.0 / max(n, 1)
    raise ConfigError(
        "privacy.delta",
        delta,
        f"is not below 1/n for {name}, which has n = {n} training rows (1/n = {bound:.3g}): a mechanism that "
        "publishes one customer's full row at random would satisfy such a guarantee; that bank would decline "
        "every round",
        f"set privacy.delta well below 1/n of the largest bank, e.g. 1/(10 n) = {bound / 10:.1e}",
    )
