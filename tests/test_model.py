"""Encoder/head split, and encoder checkpoints checked key by key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedchurn.shared.config import ModelConfig
from fedchurn.shared.errors import CheckpointError
from fedchurn.shared.model import (
    ChurnModel,
    build_model,
    content_hash,
    encoder_arrays,
    head_state,
    load_encoder_arrays,
    load_encoder_checkpoint,
    save_encoder_checkpoint,
)

FEATURES = ("age", "balance", "region=north", "region=south")
MODEL = ModelConfig(encoder_hidden=(8, 6), embedding_dim=4, head_hidden=3)


def _model(seed: int = 0) -> ChurnModel:
    torch.manual_seed(seed)
    return build_model(MODEL, input_dim=len(FEATURES))


def test_split_by_owner() -> None:
    model = _model()
    encoder = encoder_arrays(model)
    head = head_state(model)
    assert encoder and all(k.startswith("encoder.") for k in encoder)
    assert head and all(k.startswith("head.") for k in head)
    assert set(encoder) | set(head) == set(model.state_dict())
    # 4 -> 8 -> 6 -> 4, hand-counted: 4*8+8 + 8*6+6 + 6*4+4
    assert sum(v.size for v in encoder.values()) == 40 + 54 + 28
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_forward_shape() -> None:
    logits = _model()(torch.zeros(5, len(FEATURES)))
    assert logits.shape == (5,)


def test_load_encoder_arrays_checks_keys_and_shapes() -> None:
    source, target = _model(1), _model(2)
    load_encoder_arrays(target, encoder_arrays(source))
    for key, value in encoder_arrays(target).items():
        np.testing.assert_array_equal(value, encoder_arrays(source)[key])
    broken = encoder_arrays(source)
    broken["encoder.layers.0.weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"'layers.0.weight' has shape \(3, 3\), expected \(8, 4\)"):
        load_encoder_arrays(target, broken)
    missing = encoder_arrays(source)
    del missing["encoder.layers.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['layers.2.bias'\]"):
        load_encoder_arrays(target, missing)
    with pytest.raises(CheckpointError, match="does not belong to the encoder"):
        load_encoder_arrays(target, {**encoder_arrays(source), "head.layers.0.weight": np.zeros(1)})


def test_checkpoint_round_trip_and_every_mismatch_named(tmp_path: Path) -> None:
    arrays = encoder_arrays(_model(3))
    path = tmp_path / "encoder.pt"
    save_encoder_checkpoint(path, arrays, model=MODEL, feature_names=FEATURES, metadata={"objective": "test"})
    loaded = load_encoder_checkpoint(path, model=MODEL, feature_names=FEATURES)
    assert content_hash(loaded) == content_hash(arrays)

    with pytest.raises(CheckpointError, match=r"only in the checkpoint: \['region=south'\]; only in this federation"):
        load_encoder_checkpoint(path, model=MODEL, feature_names=(*FEATURES[:3], "region=east"))
    with pytest.raises(CheckpointError, match="different order"):
        load_encoder_checkpoint(path, model=MODEL, feature_names=tuple(reversed(FEATURES)))
    wider = dataclasses.replace(MODEL, encoder_hidden=(16, 6))
    with pytest.raises(CheckpointError, match=r"model.encoder_hidden.*expected \(16, 4\)"):
        load_encoder_checkpoint(path, model=wider, feature_names=FEATURES)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder_checkpoint(tmp_path / "nope.pt", model=MODEL, feature_names=FEATURES)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_encoder_checkpoint(garbage, model=MODEL, feature_names=FEATURES)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fedchurn encoder checkpoint"):
        load_encoder_checkpoint(foreign, model=MODEL, feature_names=FEATURES)


def test_edited_checkpoint_fails_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    save_encoder_checkpoint(path, encoder_arrays(_model()), model=MODEL, feature_names=FEATURES)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["encoder.layers.0.bias"] += 1.0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content hash"):
        load_encoder_checkpoint(path, model=MODEL, feature_names=FEATURES)
