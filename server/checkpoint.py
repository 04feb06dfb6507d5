"""The global encoder after every round, on the server's disk (numpy only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

CHECKPOINT_DIR = "checkpoints"


def round_checkpoint_path(output_dir: Path, server_round: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"encoder-round-{server_round:04d}.npz"


def save_round(output_dir: Path, server_round: int, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write the round's encoder atomically: a crash mid-write leaves the previous round's file intact."""
    path = round_checkpoint_path(output_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{key: np.asarray(value) for key, value in arrays.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def load_round(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
