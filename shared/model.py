"""The shared encoder, each institution's churn head, and checked encoder checkpoints.

Parameter names carry their owner as a prefix (``encoder.`` / ``head.``): only ``encoder.*`` ever leaves an
institution. No BatchNorm anywhere: Opacus cannot compute per-sample gradients through it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedchurn.shared.config import ModelConfig
from fedchurn.shared.errors import CheckpointError

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
HEAD_PREFIX = "head."
CHECKPOINT_FORMAT = "fedchurn-encoder"
CHECKPOINT_VERSION = 1


class Encoder(nn.Module):
    """MLP from preprocessed customer features to an embedding."""

    def __init__(self, *, input_dim: int, hidden: Sequence[int], embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [input_dim, *hidden, embedding_dim]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            layers.append(nn.ReLU())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


class ChurnHead(nn.Module):
    """Embedding to one churn logit. Stays at the institution."""

    def __init__(self, *, embedding_dim: int, hidden: int) -> None:
        super().__init__()
        if hidden > 0:
            self.layers: nn.Module = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            self.layers = nn.Linear(embedding_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).squeeze(-1)  # type: ignore[no-any-return]


class ChurnModel(nn.Module):
    """Encoder + head; ``forward`` returns logits of shape (batch,)."""

    def __init__(self, encoder: Encoder, head: ChurnHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # type: ignore[no-any-return]


def build_encoder(model: ModelConfig, *, input_dim: int) -> Encoder:
    return Encoder(
        input_dim=input_dim, hidden=model.encoder_hidden, embedding_dim=model.embedding_dim, dropout=model.dropout
    )


def build_model(model: ModelConfig, *, input_dim: int) -> ChurnModel:
    head = ChurnHead(embedding_dim=model.embedding_dim, hidden=model.head_hidden)
    return ChurnModel(build_encoder(model, input_dim=input_dim), head)


# --- splitting and merging parameters by owner ----------------------------------------------------


def encoder_arrays(model: ChurnModel) -> dict[str, np.ndarray]:
    """The encoder's parameters as numpy arrays, keys prefixed ``encoder.`` (what travels)."""
    return {ENCODER_PREFIX + k: v.detach().cpu().numpy().copy() for k, v in model.encoder.state_dict().items()}


def head_state(model: ChurnModel) -> dict[str, torch.Tensor]:
    """The head's parameters, keys prefixed ``head.`` (what stays home)."""
    return {HEAD_PREFIX + k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}


def _strip(prefix: str, arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            raise CheckpointError(f"parameter '{key}' does not belong to the {prefix.rstrip('.')} (prefix '{prefix}')")
        out[key[len(prefix) :]] = torch.as_tensor(np.asarray(value))
    return out


def check_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Every key present, none unexpected, every shape equal, every value finite; else name what differs."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(given)):
        if tuple(expected[key].shape) != tuple(given[key].shape):
            problems.append(f"'{key}' has shape {tuple(given[key].shape)}, expected {tuple(expected[key].shape)}")
        elif not torch.isfinite(given[key]).all():
            problems.append(f"'{key}' holds non-finite values")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def load_encoder_arrays(model: ChurnModel, arrays: Mapping[str, Any]) -> None:
    """Load ``encoder.*`` arrays into the model's encoder, checking every key and shape."""
    state = _strip(ENCODER_PREFIX, arrays)
    check_state(model.encoder.state_dict(), state, what="encoder arrays")
    model.encoder.load_state_dict(state)


def load_head_state(model: ChurnModel, state: Mapping[str, Any], *, what: str = "saved head") -> None:
    stripped = _strip(HEAD_PREFIX, state)
    check_state(model.head.state_dict(), stripped, what=what)
    model.head.load_state_dict(stripped)


# --- encoder checkpoints --------------------------------------------------------------------------


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: the same weights give the same hash anywhere."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_encoder_checkpoint(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    *,
    model: ModelConfig,
    feature_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write an encoder with what is needed to check it against a federation before use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": {
            "input_dim": len(feature_names),
            "encoder_hidden": list(model.encoder_hidden),
            "embedding_dim": model.embedding_dim,
        },
        "feature_names": list(feature_names),
        "content_hash": content_hash(arrays),
        "metadata": dict(metadata or {}),
        "state_dict": {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint where a good one was


def load_encoder_checkpoint(
    path: str | Path, *, model: ModelConfig, feature_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Read an encoder checkpoint and check format, hash, features, architecture, keys and shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder checkpoint {path} does not exist (model.encoder_checkpoint)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"encoder checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fedchurn encoder checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this fedchurn reads version "
            f"{CHECKPOINT_VERSION}"
        )
    saved_features = list(payload.get("feature_names", []))
    if saved_features != list(feature_names):
        only_saved = [f for f in saved_features if f not in feature_names]
        only_here = [f for f in feature_names if f not in saved_features]
        detail = []
        if only_saved:
            detail.append(f"only in the checkpoint: {only_saved}")
        if only_here:
            detail.append(f"only in this federation: {only_here}")
        if not detail:
            detail.append("same features in a different order")
        raise CheckpointError(f"encoder checkpoint {path} was trained on other features: " + "; ".join(detail))
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no state_dict")
    arrays = {k: v.numpy() for k, v in state.items()}
    if content_hash(arrays) != payload.get("content_hash"):
        raise CheckpointError(f"{path}: weights do not match the recorded content hash (corrupt or edited)")
    expected = build_model(model, input_dim=len(feature_names))
    check_state(
        {ENCODER_PREFIX + k: v for k, v in expected.encoder.state_dict().items()},
        {k: torch.as_tensor(v) for k, v in arrays.items()},
        what=f"encoder checkpoint {path} (check model.encoder_hidden and model.embedding_dim)",
    )
    logger.info("loaded encoder checkpoint %s (hash %s)", path, payload["content_hash"][:12])
    return arrays
