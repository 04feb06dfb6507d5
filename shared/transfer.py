"""Transfer modes: which parameters learn in which phase, and which travel. Pure rules, no torch.

The server's aggregation (server/strategy.py) and the institutions (clients/transfer.py) read the same rules
from here, so what one side sends is what the other side accepts.

=============  =============================================  ==========================  =================
mode           what learns at an institution, per round       what the reply carries      server aggregates
=============  =============================================  ==========================  =================
finetune       encoder + head, jointly                        encoder                     encoder
frozen         head only (encoder fixed as sent)              nothing                     nothing
fedrep         head (encoder fixed), then encoder (head       encoder                     encoder
               fixed): two DP phases on the same rows
fedavg         encoder + head (the usual FedAvg baseline)     encoder + head              both
local          each institution alone: no federation          (not a federation)          —
centralized    all rows pooled, NOT private                   (not a federation)          —
=============  =============================================  ==========================  =================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedchurn.shared.config import FedChurnConfig, TransferConfig
from fedchurn.shared.errors import ConfigError

# The same prefixes as shared/model.py (kept here so the torch-free server can use them; a test checks both).
ENCODER_PREFIX = "encoder."
HEAD_PREFIX = "head."

Part = Literal["all", "head", "encoder"]

FEDERATED_MODES: tuple[str, ...] = ("finetune", "frozen", "fedrep", "fedavg")  # run on Flower
REFERENCE_MODES: tuple[str, ...] = ("local", "centralized")  # run in-process by fedchurn compare
ALL_MODES: tuple[str, ...] = FEDERATED_MODES + REFERENCE_MODES


@dataclass(frozen=True)
class Phase:
    """One stretch of DP-SGD at an institution within a round."""

    parts: Part
    epochs: int


def shared_prefixes(mode: str) -> tuple[str, ...]:
    """Parameter-name prefixes that leave an institution in this mode (empty: nothing is sent back)."""
    if mode == "fedavg":
        return (ENCODER_PREFIX, HEAD_PREFIX)
    if mode == "frozen":
        return ()
    return (ENCODER_PREFIX,)


def replies_carry_arrays(mode: str) -> bool:
    return bool(shared_prefixes(mode))


def round_phases(transfer: TransferConfig, *, local_epochs: int) -> tuple[Phase, ...]:
    """The training phases of one round, in order."""
    if transfer.mode == "frozen":
        return (Phase("head", local_epochs),)
    if transfer.mode == "fedrep":
        return (Phase("head", transfer.head_epochs), Phase("encoder", local_epochs))
    return (Phase("all", local_epochs),)


def epochs_per_round(config: FedChurnConfig) -> int:
    """DP epochs over an institution's rows in one round, all phases together (they compose: same rows)."""
    return sum(phase.epochs for phase in round_phases(config.transfer, local_epochs=config.training.local_epochs))


def require_federated(config: FedChurnConfig) -> None:
    """A Flower run needs a federated mode; the reference modes run in-process (fedchurn compare)."""
    if config.transfer.mode not in FEDERATED_MODES:
        raise ConfigError(
            "transfer.mode",
            config.transfer.mode,
            f"is a reference mode, not a federation: use one of {', '.join(FEDERATED_MODES)} here",
            "run the reference modes with 'fedchurn compare --modes local,centralized'",
        )


def outside_mode(keys: list[str] | tuple[str, ...] | set[str], mode: str) -> list[str]:
    """Parameter names this mode never lets travel (the head outside fedavg, anything unknown)."""
    prefixes = shared_prefixes(mode)
    return sorted(k for k in keys if not any(k.startswith(p) for p in prefixes))
