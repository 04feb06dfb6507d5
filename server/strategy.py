"""Encoder-only aggregation with reply validation, on top of Flower's strategies (numpy + flwr; no torch).

Flower's strategies own the round loop; we hook ``configure_train``, ``aggregate_train`` and
``aggregate_evaluate`` to drop bad replies (each with a logged reason), aggregate in a fixed order (so the same
seed gives the same encoder), and tell an observer what each institution reported.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from fedchurn.server.reply_checks import (
    check_config_records,
    check_encoder_update,
    check_member,
    check_metrics,
    relative_bounds,
    reply_institution,
    update_norm,
)
from fedchurn.shared.config import StrategyConfig
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.transfer import outside_mode, replies_carry_arrays
from fedchurn.shared.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE_METRICS,
    IDENTITY_KEY,
    METRICS_KEY,
    TRAIN_METRICS,
    WEIGHT_KEY,
    calibration_key,
    from_array_record,
    to_array_record,
)

__all__ = [
    "DroppedReply",
    "EncoderAggregation",
    "Reply",
    "RoundObserver",
    "check_encoder_update",
    "check_metrics",
    "make_strategy",
    "reply_institution",
]

logger = logging.getLogger(__name__)


class TooFewNodesError(FedChurnError):
    """Fewer institutions are online than a round needs, for longer than the round timeout."""


@dataclass(frozen=True)
class Reply:
    """A reply that passed validation."""

    institution: str
    metrics: dict[str, float]  # as reported (the consortium ledger records these)
    message: Message
    weight: float  # the aggregation weight used: num-examples capped at strategy.max_examples


@dataclass(frozen=True)
class DroppedReply:
    institution: str  # "node <id>" when the reply did not say
    reason: str


class RoundObserver(Protocol):
    def on_train(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None: ...

    def on_evaluate(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None: ...


class EncoderAggregation:
    """Mixin for a Flower strategy: validate, bound, order and observe replies. Put it before the strategy class.

    Every reply is checked before use (``server/reply_checks.py``); a bad one is dropped with its reason and the
    round goes on. Of the replies that pass: an update whose norm exceeds ``bound_multiplier`` × the median norm of
    the other replies is scaled down to that bound, and each weight (``num-examples``) is capped at
    ``max_examples`` and at ``bound_multiplier`` × the median weight of the others, so no single institution can
    dominate the aggregate.
    """

    observer: RoundObserver | None = None
    max_update_norm: float | None = None
    bound_multiplier: float | None = None
    max_examples: float | None = None
    members: Mapping[int, str] | None = None  # node id -> registered institution (None: no registry)
    min_replies: int = 1
    node_wait_s: float = 600.0  # how long a round waits for min_replies nodes to be online (round_timeout_s)
    transfer_mode: str = "finetune"  # shared/transfer.py: which arrays replies carry and what is aggregated
    _reference: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = from_array_record(arrays)  # what the institutions were sent this round
        self._wait_for_nodes(server_round, grid)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc,no-any-return]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_nodes(server_round, grid)
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc,no-any-return]

    def _wait_for_nodes(self, server_round: int, grid: Grid) -> None:
        """Flower waits for ``min_replies`` nodes without end; we wait at most ``node_wait_s``, then fail clearly."""
        deadline = time.monotonic() + self.node_wait_s
        while (online := len(list(grid.get_node_ids()))) < self.min_replies:
            if time.monotonic() >= deadline:
                raise TooFewNodesError(
                    f"round {server_round}: {online} institution(s) online after {self.node_wait_s:g} s, fewer "
                    f"than strategy.min_replies = {self.min_replies}. Start the missing SuperNodes (fedchurn "
                    "federation nodes NAME shows who is online) or lower strategy.min_replies; the run can be "
                    "resumed from its last completed round"
                )
            time.sleep(min(1.0, self.node_wait_s))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with_arrays = replies_carry_arrays(self.transfer_mode)
        accepted, dropped = self._screen(replies, allowed=TRAIN_METRICS, with_arrays=with_arrays, train=True)
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
        norms = self._norms(accepted)
        bounds = relative_bounds(norms, self.bound_multiplier)
        messages = [self._bounded(server_round, reply, norms, bounds) for reply in accepted]
        return super().aggregate_train(server_round, messages)  # type: ignore[misc,no-any-return]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted, dropped = self._screen(replies, allowed=EVALUATE_METRICS, with_arrays=False, train=False)
        if self.observer is not None:
            self.observer.on_evaluate(server_round, accepted, dropped)
        if not accepted:
            return None
        return super().aggregate_evaluate(server_round, [self._weighted(r) for r in accepted])  # type: ignore[misc,no-any-return]

    def _weighted(self, reply: Reply) -> Message:
        """The reply's message carrying its checked metrics and its capped weight (what the aggregate uses)."""
        message = reply.message
        # the round's pooled figures: per-bin reliability figures are one bank's own, not averaged
        pooled = {k: v for k, v in reply.metrics.items() if calibration_key(k) is None}
        message.content[METRICS_KEY] = MetricRecord({**pooled, WEIGHT_KEY: reply.weight})
        return message

    def _norms(self, accepted: list[Reply]) -> dict[str, float]:
        if self._reference is None or not self.bound_multiplier:
            return {}
        reference = self._reference
        return {
            r.institution: update_norm(from_array_record(r.message.content.array_records[ARRAYS_KEY]), reference)
            for r in accepted
        }

    def _bounded(self, server_round: int, reply: Reply, norms: dict[str, float], bounds: dict[str, float]) -> Message:
        """The reply's message, its weight capped and its update scaled down to this round's norm bound."""
        message = self._weighted(reply)
        if self._reference is None or reply.institution not in bounds:
            return message
        norm, bound = norms[reply.institution], bounds.get(reply.institution)
        if bound is None or norm <= bound:
            return message
        scale = bound / norm
        arrays = from_array_record(message.content.array_records[ARRAYS_KEY])
        scaled = {
            key: (ref + scale * (arrays[key].astype(np.float64) - ref)).astype(arrays[key].dtype)
            for key, ref in ((k, v.astype(np.float64)) for k, v in self._reference.items())
        }
        message.content[ARRAYS_KEY] = to_array_record(scaled)
        logger.warning(
            "round %d: %s's update norm %.4g scaled down to %.4g (%g x the median norm of the other replies)",
            server_round,
            reply.institution,
            norm,
            bound,
            self.bound_multiplier,
        )
        return message

    def _screen(
        self, replies: Iterable[Message], *, allowed: tuple[str, ...], with_arrays: bool, train: bool = True
    ) -> tuple[list[Reply], list[DroppedReply]]:
        accepted: dict[str, Reply] = {}
        dropped: list[DroppedReply] = []
        for message in replies:
            name = reply_institution(message)
            who = name or f"node {message.metadata.src_node_id}"
            try:
                reason = self._problem(message, name, allowed=allowed, with_arrays=with_arrays, train=train)
            except Exception as exc:  # a reply must never crash the server, whatever it holds
                reason = f"unreadable reply ({type(exc).__name__})"
            if reason is None and name in accepted:
                reason = "a second reply from the same institution in one round"
            if reason is not None or name is None:  # _problem refuses a reply that names no institution
                reason = reason or "no institution named"
                logger.warning("dropping reply from %s: %s", who, reason)
                dropped.append(DroppedReply(institution=who, reason=reason))
                continue
            metrics = {str(k): float(v) for k, v in message.content[METRICS_KEY].items()}  # type: ignore[union-attr,arg-type]
            accepted[name] = Reply(institution=name, metrics=metrics, message=message, weight=metrics[WEIGHT_KEY])
        weights = self._capped_weights({name: reply.weight for name, reply in accepted.items()}, train=train)
        # A fixed order makes floating-point sums, and so whole runs, reproducible.
        return [dataclasses.replace(accepted[name], weight=weights[name]) for name in sorted(accepted)], dropped

    def _capped_weights(self, reported: dict[str, float], *, train: bool = True) -> dict[str, float]:
        """Each weight capped at ``max_examples`` and at ``bound_multiplier`` x the median weight of the others.

        A capped training weight changes the encoder, so it is a warning; an evaluation weight (a bank's DP-noised
        test count) only weights the round's mean metrics, and a large bank's is capped in ordinary runs: debug.
        """
        weights = {
            name: min(value, self.max_examples) if self.max_examples is not None else value
            for name, value in reported.items()
        }
        bounds = relative_bounds(weights, self.bound_multiplier)
        capped = {name: min(value, bounds.get(name, value)) for name, value in weights.items()}
        for name, value in sorted(capped.items()):
            if value < reported[name]:
                logger.log(
                    logging.WARNING if train else logging.DEBUG,
                    "%s reports %s = %.4g; weighted as %.4g",
                    name,
                    WEIGHT_KEY,
                    reported[name],
                    value,
                )
        return capped

    def _problem(
        self, message: Message, name: str | None, *, allowed: tuple[str, ...], with_arrays: bool, train: bool
    ) -> str | None:
        if message.has_error():
            return f"the institution reported an error: {str(message.error.reason)[:200]}"
        content = message.content
        if name is None:
            return f"no '{IDENTITY_KEY}' record naming the institution"
        problem = check_member(message, name, self.members) or check_config_records(message, allow_ledger=train)
        if problem:
            return problem
        if set(content.metric_records) != {METRICS_KEY}:
            return f"expected one metric record '{METRICS_KEY}', got {sorted(content.metric_records)[:10]}"
        problem = check_metrics(content.metric_records[METRICS_KEY], allowed, per_bin=not train)
        if problem or not with_arrays:
            if problem is None and content.array_records:
                return f"arrays sent where none are expected: {sorted(content.array_records)[:10]}"
            return problem
        if set(content.array_records) != {ARRAYS_KEY}:
            return f"expected one array record '{ARRAYS_KEY}', got {sorted(content.array_records)[:10]}"
        if self._reference is None:
            return "no encoder was sent this round"
        arrays = from_array_record(content.array_records[ARRAYS_KEY])
        not_shared = outside_mode(list(arrays), self.transfer_mode)
        if not_shared:
            return f"unexpected {not_shared[:8]}: parameters that transfer.mode {self.transfer_mode!r} does not share"
        return check_encoder_update(arrays, self._reference, max_update_norm=self.max_update_norm)


class ValidatedFedAvg(EncoderAggregation, FedAvg):
    """Weighted FedAvg of the encoder."""


class ValidatedFedProx(EncoderAggregation, FedProx):
    """FedAvg plus a proximal pull at the institutions (``proximal-mu`` is sent in the train config)."""


class ValidatedFedAdam(EncoderAggregation, FedAdam):
    """Server-side Adam on the averaged encoder update."""


class ValidatedFedMedian(EncoderAggregation, FedMedian):
    """Coordinate-wise median of the encoders (unweighted): robust to a minority of arbitrary updates."""


class ValidatedFedTrimmedAvg(EncoderAggregation, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (unweighted): the largest and smallest ``trim_fraction`` cut per coordinate."""


def make_strategy(
    config: StrategyConfig,
    *,
    observer: RoundObserver | None,
    min_available: int,
    transfer_mode: str = "finetune",
    members: Mapping[int, str] | None = None,
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
    if config.name == "fedavg" and config.aggregation == "median":
        strategy = ValidatedFedMedian(**common)
    elif config.name == "fedavg" and config.aggregation == "trimmed_mean":
        strategy = ValidatedFedTrimmedAvg(**common, beta=config.trim_fraction)
    elif config.name == "fedavg":
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
    strategy.bound_multiplier = config.bound_multiplier
    strategy.max_examples = config.max_examples
    strategy.members = members
    strategy.min_replies = config.min_replies
    strategy.node_wait_s = config.round_timeout_s
    strategy.transfer_mode = transfer_mode
    return strategy
