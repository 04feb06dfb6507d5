"""What of a model travels in each transfer mode (torch side of shared/transfer.py).

Only ``fedavg`` lets the head leave an institution; ``frozen`` sends nothing back. Loading refuses any array the
mode does not share, so a misconfigured peer cannot slip a head (or anything else) into a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.errors import CheckpointError
from fedchurn.shared.model import (
    ENCODER_PREFIX,
    HEAD_PREFIX,
    ChurnModel,
    build_model,
    encoder_arrays,
    load_encoder_arrays,
    load_head_state,
)
from fedchurn.shared.transfer import shared_prefixes

GLOBAL_HEAD_FILE = "global-head.pt"  # fedavg only: the aggregated head, beside encoder.pt


def head_arrays(model: ChurnModel) -> dict[str, np.ndarray]:
    """The head's parameters as numpy arrays, keys prefixed ``head.``."""
    return {HEAD_PREFIX + k: v.detach().cpu().numpy().copy() for k, v in model.head.state_dict().items()}


def split_shared(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(encoder.* arrays, head.* arrays); any other key is refused."""
    other = sorted(k for k in arrays if not k.startswith((ENCODER_PREFIX, HEAD_PREFIX)))
    if other:
        raise CheckpointError(f"arrays {other} belong to neither the encoder nor the head")
    encoder = {k: v for k, v in arrays.items() if k.startswith(ENCODER_PREFIX)}
    head = {k: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}
    return encoder, head


def outgoing_arrays(model: ChurnModel, *, mode: str) -> dict[str, np.ndarray]:
    """What an institution sends back after training in ``mode``."""
    prefixes = shared_prefixes(mode)
    out: dict[str, np.ndarray] = {}
    if ENCODER_PREFIX in prefixes:
        out.update(encoder_arrays(model))
    if HEAD_PREFIX in prefixes:
        out.update(head_arrays(model))
    return out


def load_shared_arrays(model: ChurnModel, arrays: Mapping[str, Any], *, mode: str) -> None:
    """Load what the server sent: always the encoder; the head too in fedavg (which then replaces the local one)."""
    allowed = shared_prefixes(mode) or (ENCODER_PREFIX,)  # frozen: the encoder still comes down
    refused = sorted(k for k in arrays if not k.startswith(allowed))
    if refused:
        raise CheckpointError(f"transfer.mode {mode!r} does not share {refused}: refusing the server's arrays")
    encoder, head = split_shared(arrays)
    load_encoder_arrays(model, encoder)
    if HEAD_PREFIX in allowed:
        load_head_state(model, head, what="the global head (transfer.mode 'fedavg')")


def initial_shared_arrays(
    config: FedChurnConfig, encoder: Mapping[str, np.ndarray], *, input_dim: int
) -> dict[str, np.ndarray]:
    """Round 1's arrays: the encoder, plus in fedavg the seeded head every institution would start from."""
    arrays = dict(encoder)
    if HEAD_PREFIX in shared_prefixes(config.transfer.mode):
        torch.manual_seed(derive_seed(config.seed, "head"))  # as clients/institution.py seeds a fresh model
        arrays.update(head_arrays(build_model(config.model, input_dim=input_dim)))
    return arrays


def save_global_head(output_dir: str | Path, head: Mapping[str, np.ndarray]) -> Path:
    """fedavg: write the aggregated head (``head.*`` tensors) beside the final encoder."""
    path = Path(output_dir) / GLOBAL_HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in head.items()}, tmp)
    os.replace(tmp, path)
    return path
