"""Where an encoder checkpoint comes from, and the check that it fits a federation before round 1.

A pretrained checkpoint's metadata (``save_encoder_checkpoint(..., metadata=...)``) records:

- ``schema``: the feature order and a fingerprint of it (which columns, numeric or one-hot, in which order), and
  the label it was trained for (supervised objective only);
- ``objective``, ``source`` (kind, description, fingerprint of the rows used), ``metrics``, ``training``;
- ``versions`` of the libraries, and the checkpoint's ``content_hash`` (written by shared/model.py).

``load_checked_encoder`` is what the server uses: shared/model.py checks format, content hash, feature names,
architecture, keys and shapes; this adds the metadata checks (a schema fingerprint that does not match the
federation's features is refused, naming the features that differ).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedchurn.shared.config import FedChurnConfig, SchemaConfig
from fedchurn.shared.errors import CheckpointError
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.model import load_encoder_checkpoint

logger = logging.getLogger(__name__)

PROVENANCE_VERSION = 1


def schema_fingerprint(schema: SchemaConfig) -> str:
    """sha256 of the model's input contract: each feature's name and kind, in input order (not the label)."""
    features = [[name, "numeric"] for name in schema.numeric]
    for column, values in schema.categorical.items():
        features.extend([f"{column}={value}", "one-hot"] for value in values)
    text = json.dumps(features, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def array_fingerprint(*arrays: np.ndarray | None) -> str:
    """sha256 over dtypes, shapes and bytes of the arrays (None counts as absent)."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        value = np.ascontiguousarray(array)
        digest.update(str(value.dtype).encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of what produced a result (checkpoints, ledger records)."""
    return dict(_library_versions())


@functools.cache  # metadata look-ups cost milliseconds; versions do not change while a process runs
def _library_versions() -> tuple[tuple[str, str], ...]:
    # str(): torch.__version__ is a TorchVersion, which a weights-only torch.load refuses
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    for package in ("ray", "fedchurn", "opacus", "flwr"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return tuple(versions.items())


def schema_metadata(schema: SchemaConfig, *, with_label: bool) -> dict[str, Any]:
    return {
        "fingerprint": schema_fingerprint(schema),
        "feature_names": list(schema.feature_names),
        "label": schema.label if with_label else None,
        "positive": schema.positive if with_label else None,
    }


def read_encoder_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata block of an encoder checkpoint, with its content hash (no weight checks: see load)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"encoder checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"encoder checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a fedchurn encoder checkpoint")
    meta = payload.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a mapping")
    return {**meta, "content_hash": payload.get("content_hash")}


def check_schema_metadata(metadata: Mapping[str, Any], schema: SchemaConfig, *, path: str | Path) -> None:
    """Refuse a checkpoint whose recorded schema fingerprint differs from the federation's; name the features."""
    recorded = metadata.get("schema")
    if not isinstance(recorded, Mapping) or "fingerprint" not in recorded:
        logger.info("encoder checkpoint %s records no schema fingerprint (not from fedchurn pretrain)", path)
        return
    if recorded["fingerprint"] == schema_fingerprint(schema):
        return
    saved = [str(f) for f in recorded.get("feature_names", [])]
    here = list(schema.feature_names)
    detail = []
    if [f for f in saved if f not in here]:
        detail.append(f"only in the checkpoint: {[f for f in saved if f not in here]}")
    if [f for f in here if f not in saved]:
        detail.append(f"only in this federation: {[f for f in here if f not in saved]}")
    if not detail:
        detail.append("same feature names, but a different order or numeric/categorical kind")
    raise CheckpointError(
        f"encoder checkpoint {path} was pretrained on another schema (fingerprint "
        f"{str(recorded['fingerprint'])[:12]} vs {schema_fingerprint(schema)[:12]}): " + "; ".join(detail)
    )


def load_checked_encoder(config: FedChurnConfig, feature_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The configured checkpoint's encoder arrays, after every weight and provenance check."""
    path = config.model.encoder_checkpoint
    if not path:
        raise CheckpointError("model.encoder_checkpoint is not set")
    arrays = load_encoder_checkpoint(path, model=config.model, feature_names=feature_names)
    schema = resolve_schema(config.data)
    metadata = read_encoder_metadata(path)
    check_schema_metadata(metadata, schema, path=path)
    recorded = metadata.get("schema") or {}
    label = recorded.get("label") if isinstance(recorded, Mapping) else None
    if label is not None and (label, recorded.get("positive")) != (schema.label, schema.positive):
        logger.warning(
            "encoder checkpoint %s was pretrained to predict %s=%r; this federation's label is %s=%r",
            path,
            label,
            recorded.get("positive"),
            schema.label,
            schema.positive,
        )
    logger.info(
        "encoder checkpoint %s: objective %s, source %s, hash %s",
        path,
        metadata.get("objective", "unknown"),
        (metadata.get("source") or {}).get("description", "unknown"),
        str(metadata.get("content_hash"))[:12],
    )
    return arrays


def check_transfer_setup(config: FedChurnConfig) -> None:
    """Before any process starts: a federated transfer mode, and a checkpoint (if any) that fits the federation."""
    from fedchurn.shared.transfer import require_federated

    require_federated(config)
    if config.model.encoder_checkpoint:
        load_checked_encoder(config, resolve_schema(config.data).feature_names)
