"""Encoder-only aggregation with reply validation, on top of Flower's strategies (numpy + flwr; no torch).

Flower's strategies own the round loop; we hook ``configure_train``, ``aggregate_train`` and
``aggregate_evaluate`` to drop bad replies (each with a logged reason), aggregate in a fixed order (so the same
seed gives the same encoder), and tell an observer what each institution reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from shared.config import StrategyConfig
from shared.transfer import outside_mode, replies_carry_arrays
from shared.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE_METRICS,
    IDENTITY_KEY,
    INSTITUTION_FIELD,
    METRICS_KEY,
    TRAIN_METRICS,
    WEIGHT_KEY,
    from_array_record,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """A reply that passed validation."""

    institution: str
    metrics: dict[str, float]
    message: Message


@dataclass(frozen=True)
class DroppedReply:
    institution: str  # "node <id>" when the reply did not say
    reason: str


class RoundObserver(Protocol):
    def on_train(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None: ...

    def on_evaluate(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None: ...


def reply_institution(message: Message) -> str | None:
    content = message.content
    if IDENTITY_KEY not in content.config_records:
        return None
    name = content.config_records[IDENTITY_KEY].get(INSTITUTION_FIELD)
    return name if isinstance(name, str) and name else None


def check_metrics(metrics: Mapping[str, Any], allowed: tuple[str, ...]) -> str | None:
    """Why these reply metrics are unacceptable, or None."""
    extra = sorted(set(metrics) - set(allowed))
    if extra:
        return f"metrics outside the whitelist: {extra}"
    missing = sorted(set(allowed) - set(metrics))
    if missing:
        return f"metrics missing: {missing}"
    weight = metrics[WEIGHT_KEY]
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    return None


def check_encoder_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_update_norm: float | None,
) -> str | None:
    """Why an encoder sent back cannot be aggregated, or None. Pure numpy."""
    missing = sorted(set(reference) - set(arrays))
    unexpected = sorted(set(arrays) - set(reference))
    if missing or unexpected:
        return f"wrong keys (missing {missing}, unexpected {unexpected})"
    squared = 0.0
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            return f"'{key}' has shape {value.shape}, expected {ref.shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"'{key}' has dtype {value.dtype}, expected floating point"
        if not np.all(np.isfinite(value)):
            return f"'{key}' holds non-finite values"
        squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    if max_update_norm is not None and math.sqrt(squared) > max_update_norm:
        return f"update norm {math.sqrt(squared):.4g} exceeds strategy.max_update_norm {max_update_norm:.4g}"
    return None


class EncoderAggregation:
    """Mixin for a Flower strategy: validate, order and observe replies. Put it before the strategy class."""

    observer: RoundObserver | None = None
    max_update_norm: float | None = None
    min_replies: int = 1
    transfer_mode: str = "finetune"  # shared/transfer.py: which arrays replies carry and what is aggregated
    _reference: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = from_array_record(arrays)  # what the institutions were sent this round
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc,no-any-return]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with_arrays = replies_carry_arrays(self.transfer_mode)
        accepted, dropped = self._screen(replies, allowed=TRAIN_METRICS, with_arrays=with_arrays)
        if self.observer is not None:
            self.observer.on_train(server_round, accepted, dropped)
        if len(accepted) < self.min_replies:
            logger.warning(
                "round %d: %d valid replies, fewer than strategy.min_replies=%d; the encoder is not updated",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        if not with_arrays:  # transfer.mode 'frozen': the encoder stays as sent, nothing to aggregate
            return None, None
        return super().aggregate_train(server_round, [r.message for r in accepted])  # type: ignore[misc,no-any-return]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted, dropped = self._screen(replies, allowed=EVALUATE_METRICS, with_arrays=False)
        if self.observer is not None:
            self.observer.on_evaluate(server_round, accepted, dropped)
        if not accepted:
            return None
        return super().aggregate_evaluate(server_round, [r.message for r in accepted])  # type: ignore[misc,no-any-return]

    def _screen(
        self, replies: Iterable[Message], *, allowed: tuple[str, ...], with_arrays: bool
    ) -> tuple[list[Reply], list[DroppedReply]]:
        accepted: dict[str, Reply] = {}
        dropped: list[DroppedReply] = []
        for message in replies:
            name = reply_institution(message) if not message.has_error() else None
            who = name or f"node {message.metadata.src_node_id}"
            reason = self._problem(message, name, allowed=allowed, with_arrays=with_arrays)
            if reason is None and name in accepted:
                reason = "a second reply from the same institution in one round"
            if reason is not None:
                logger.warning("dropping reply from %s: %s", who, reason)
                dropped.append(DroppedReply(institution=who, reason=reason))
                continue
            metrics = {k: float(v) for k, v in message.content[METRICS_KEY].items()}  # type: ignore[union-attr,arg-type]
            accepted[name] = Reply(institution=name, metrics=metrics, message=message)  # type: ignore[index,arg-type]
        # A fixed order makes floating-point sums, and so whole runs, reproducible.
        return [accepted[name] for name in sorted(accepted)], dropped

    def _problem(
        self, message: Message, name: str | None, *, allowed: tuple[str, ...], with_arrays: bool
    ) -> str | None:
        if message.has_error():
            return f"the institution reported an error: {message.error.reason}"
        content = message.content
        if name is None:
            return f"no '{IDENTITY_KEY}' record naming the institution"
        if set(content.metric_records) != {METRICS_KEY}:
            return f"expected one metric record '{METRICS_KEY}', got {sorted(content.metric_records)}"
        problem = check_metrics(content.metric_records[METRICS_KEY], allowed)
        if problem or not with_arrays:
            if problem is None and content.array_records:
                return f"arrays sent where none are expected: {sorted(content.array_records)}"
            return problem
        if set(content.array_records) != {ARRAYS_KEY}:
            return f"expected one array record '{ARRAYS_KEY}', got {sorted(content.array_records)}"
        if self._reference is None:
            return "no encoder was sent this round"
        arrays = from_array_record(content.array_records[ARRAYS_KEY])
        not_shared = outside_mode(list(arrays), self.transfer_mode)
        if not_shared:
            return f"unexpected {not_shared[:8]}: parameters that transfer.mode {self.transfer_mode!r} does not share"
        return check_encoder_update(
            arrays,
            self._reference,
            max_update_norm=self.max_update_norm,
        )


class ValidatedFedAvg(EncoderAggregation, FedAvg):
    """Weighted FedAvg of the encoder."""


class ValidatedFedProx(EncoderAggregation, FedProx):
    """FedAvg plus a proximal pull at the institutions (``proximal-mu`` is sent in the train config)."""


class ValidatedFedAdam(EncoderAggregation, FedAdam):
    """Server-side Adam on the averaged encoder update."""


def make_strategy(
    config: StrategyConfig,
    *,
    observer: RoundObserver | None,
    min_available: int,
    transfer_mode: str = "finetune",
) -> EncoderAggregation:
    """The configured strategy, validating replies and reporting to ``observer``."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_replies,
        "min_evaluate_nodes": config.min_replies,
        "min_available_nodes": max(min_available, config.min_replies),
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "weighted_by_key": WEIGHT_KEY,
    }
    strategy: EncoderAggregation
    if config.name == "fedavg":
        strategy = ValidatedFedAvg(**common)
    elif config.name == "fedprox":
        strategy = ValidatedFedProx(**common, proximal_mu=config.proximal_mu)
    else:
        strategy = ValidatedFedAdam(
            **common,
            eta=config.server_learning_rate,
            eta_l=config.server_learning_rate,
            beta_1=config.server_beta_1,
            beta_2=config.server_beta_2,
            tau=config.server_tau,
        )
    strategy.observer = observer
    strategy.max_update_norm = config.max_update_norm
    strategy.min_replies = config.min_replies
    strategy.transfer_mode = transfer_mode
    return strategy
