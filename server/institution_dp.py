"""Institution-level DP at the server (optional): clip each institution's update, add Gaussian noise to the average.

Built on Flower's ``DifferentialPrivacyServerSideFixedClipping`` wrapper (its clipping and noise helpers), around
our :class:`~server.strategy.EncoderAggregation`, so reply validation stays ours: replies are checked *before*
they are clipped (a malformed reply is left untouched for the inner strategy to drop and report, instead of
crashing the clipping), and a reply with an error drops only that reply, not the whole round.

The guarantee is for a whole institution's contribution to one round (its encoder update, zero-out adjacency:
the update replaced by no change; the FedAvg weight, the institution's row count, is public). It is a different
guarantee from the per-customer ε of DP-SGD and is reported apart from it. Noise std is σ·C/n for n contributing
institutions (Flower's formula); with FedAvg weights w_i (shares of the total) one institution moves the average
by at most max_i w_i · C, so this round's effective noise multiplier is σ / (n · max_i w_i) (= σ with equal
weights). Rounds compose as Gaussian mechanisms without sampling: exactly μ-GDP with μ = sqrt(Σ 1/σ_t²).

numpy + flwr + stdlib only, like the rest of the server's aggregation path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedchurn.server.strategy import EncoderAggregation, check_encoder_update
from fedchurn.shared.config import InstitutionDPConfig
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.wire import WEIGHT_KEY, from_array_record

logger = logging.getLogger(__name__)

__all__ = ["InstitutionLevelDP", "Release", "gaussian_composition_epsilon"]


@dataclass(frozen=True)
class Release:
    """One noisy aggregate released at the server."""

    server_round: int
    contributors: int
    max_weight_share: float
    noise_std: float
    effective_noise_multiplier: float  # noise std / (max weight share · clipping norm)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of a μ-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13)."""
    first = _phi(-epsilon / mu + mu / 2.0)
    tail = _phi(-epsilon / mu - mu / 2.0)
    second = math.exp(epsilon + math.log(tail)) if tail > 0.0 else 0.0
    return first - second


def gaussian_composition_epsilon(noise_multipliers: Sequence[float], *, delta: float) -> float:
    """Exact ε at ``delta`` of Gaussian mechanisms (no sampling) with these noise multipliers, composed."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = {delta!r}: must be in (0, 1)")
    if not noise_multipliers:
        return 0.0
    if any(sigma <= 0.0 for sigma in noise_multipliers):
        return math.inf
    mu = math.sqrt(sum(1.0 / sigma**2 for sigma in noise_multipliers))
    if _gdp_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while _gdp_delta(high, mu) > delta:
        low, high = high, high * 2.0
        if high > 600.0:
            return math.inf
    for _ in range(200):
        middle = (low + high) / 2.0
        if _gdp_delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
        if high - low < 1e-10:
            break
    return high  # the upper end: never below the true ε


class InstitutionLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around an :class:`EncoderAggregation`, validating before clipping."""

    def __init__(
        self,
        strategy: EncoderAggregation,
        config: InstitutionDPConfig,
        *,
        strategy_name: str,
        accepted_weights: Callable[[int], list[float]],
        on_release: Callable[[Release], None],
    ) -> None:
        if strategy_name not in ("fedavg", "fedprox"):
            raise ConfigError(
                "institution_dp.enabled",
                True,
                f"needs strategy.name 'fedavg' or 'fedprox' (got {strategy_name!r}): server-side noise bounds an "
                "institution's influence on a weighted average, not on a server optimizer's step",
            )
        # num_sampled_clients is set each round to the institutions whose update is aggregated.
        super().__init__(strategy, config.noise_multiplier, config.clipping_norm, 1)  # type: ignore[arg-type]
        self._accepted_weights = accepted_weights
        self._on_release = on_release

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies_list = list(replies)
        reference = from_array_record(self.current_arrays)
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies_list:
            if reply.has_error():
                continue
            for name, record in list(reply.content.array_records.items()):
                if check_encoder_update(from_array_record(record), reference, max_update_norm=None) is not None:
                    continue  # malformed: the inner strategy drops it with the reason
                arrays = record.to_numpy_ndarrays()
                compute_clip_model_update(param1=arrays, param2=current, clipping_norm=self.clipping_norm)
                reply.content[name] = ArrayRecord(
                    {key: Array(value) for key, value in zip(record.keys(), arrays, strict=True)}
                )
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies_list)
        if aggregated is None:
            return aggregated, metrics
        weights = self._accepted_weights(server_round)
        if not weights:
            return aggregated, metrics
        self.num_sampled_clients = len(weights)
        noisy = self._add_noise_to_aggregated_arrays(aggregated)
        share = max(weights) / sum(weights)
        std = self.noise_multiplier * self.clipping_norm / len(weights)
        release = Release(
            server_round=server_round,
            contributors=len(weights),
            max_weight_share=share,
            noise_std=std,
            effective_noise_multiplier=std / (share * self.clipping_norm),
        )
        logger.info(
            "round %d: institution-level DP, %d updates clipped to %g, noise std %.4g (effective σ %.4g)",
            server_round,
            release.contributors,
            self.clipping_norm,
            std,
            release.effective_noise_multiplier,
        )
        self._on_release(release)
        return noisy, metrics


def accepted_weight(metrics: dict[str, float]) -> float:
    return float(metrics[WEIGHT_KEY])
