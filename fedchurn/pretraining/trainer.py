"""Pretraining the shared encoder on source data with Ray Train (``ray.train.torch.TorchTrainer``).

Objectives:

- ``supervised``: encoder + a temporary churn head on a labelled source table (binary cross-entropy);
- ``self_supervised``: a denoising, masked-feature objective for unlabelled data: a share ``mask_fraction`` of
  each row's features is replaced by the same feature of another row of the batch (swap noise), and a small
  decoder reconstructs the original row from the embedding (mean squared error).

Workers train data-parallel (DDP through ``ray.train.torch.prepare_model``; each takes every world-size-th row),
on a local Ray bounded by ``simulation.ray_num_cpus`` or on a cluster (``ray_address``). Only the encoder is
kept: the head or decoder is discarded. The checkpoint carries its provenance (shared/provenance.py).

Pretraining is NOT differentially private: use public or consented source data only.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedchurn.clients.metrics import roc_auc
from fedchurn.pretraining.source_data import SourceData, load_source
from fedchurn.shared.config import FedChurnConfig, ModelConfig, config_to_dict
from fedchurn.shared.errors import SimulationError
from fedchurn.shared.model import ENCODER_PREFIX, ChurnHead, Encoder, build_encoder, save_encoder_checkpoint
from fedchurn.shared.provenance import PROVENANCE_VERSION, library_versions, schema_metadata

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
METADATA_FILE = "pretrain.json"
_CHECKPOINT_FILE = "encoder-state.pt"
_STORAGE_DIR = "ray-train"  # Ray Train's run storage while training; removed once the encoder is written


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    metadata: dict[str, Any]
    arrays: dict[str, np.ndarray]


class PretrainNet(nn.Module):
    """Encoder + the objective's auxiliary module (a churn head, or a decoder back to the features)."""

    def __init__(self, model: ModelConfig, *, input_dim: int, objective: str) -> None:
        super().__init__()
        self.encoder: Encoder = build_encoder(model, input_dim=input_dim)
        self.aux: nn.Module
        if objective == "supervised":
            self.aux = ChurnHead(embedding_dim=model.embedding_dim, hidden=model.head_hidden)
        else:
            width = model.encoder_hidden[-1] if model.encoder_hidden else model.embedding_dim
            self.aux = nn.Sequential(nn.Linear(model.embedding_dim, width), nn.ReLU(), nn.Linear(width, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(self.encoder(x))  # type: ignore[no-any-return]


def swap_noise(x: torch.Tensor, *, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted x, mask): each entry, with probability ``fraction``, takes that column's value in a random row."""
    n, d = x.shape
    mask = torch.rand((n, d), generator=generator) < fraction
    donors = torch.randint(0, n, (n, d), generator=generator)
    swapped = torch.gather(x, 0, donors)
    return torch.where(mask, swapped, x), mask


def objective_loss(
    net: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor | None,
    *,
    objective: str,
    fraction: float,
    generator: torch.Generator,
) -> torch.Tensor:
    if objective == "supervised":
        if yb is None:
            raise ValueError("the supervised objective needs labels")
        return nn.functional.binary_cross_entropy_with_logits(net(xb).squeeze(-1), yb)
    corrupted, _ = swap_noise(xb, fraction=fraction, generator=generator)
    return nn.functional.mse_loss(net(corrupted), xb)


def _validation_metrics(
    net: PretrainNet, x: np.ndarray, y: np.ndarray | None, *, objective: str, fraction: float, seed: int
) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(x)
        generator = torch.Generator().manual_seed(seed)
        yt = torch.from_numpy(y) if y is not None else None
        loss = float(objective_loss(net, xt, yt, objective=objective, fraction=fraction, generator=generator))
        out = {"val_loss": loss}
        if objective == "supervised" and y is not None:
            out["val_auc"] = roc_auc(y.astype(np.int64), net(xt).squeeze(-1).double().numpy())
    net.train()
    return out


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: this worker's shard, DDP gradients, rank 0 validates and checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    seed = int(loop_config["seed"])
    objective = str(loop_config["objective"])
    fraction = float(loop_config["mask_fraction"])
    x_all: np.ndarray = loop_config["x_train"]
    y_all: np.ndarray | None = loop_config["y_train"]
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = PretrainNet(loop_config["model"], input_dim=x_all.shape[1], objective=objective)
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1
    device = ray.train.torch.get_device()
    x = torch.from_numpy(np.ascontiguousarray(x_all[rank::world])).to(device)
    y = torch.from_numpy(np.ascontiguousarray(y_all[rank::world])).to(device) if y_all is not None else None
    optimizer = torch.optim.Adam(model.parameters(), lr=float(loop_config["learning_rate"]))
    batch = int(loop_config["batch_size"])
    # Every rank takes the same number of steps (DDP needs them in lockstep): the largest shard's batches.
    steps = math.ceil(math.ceil(len(x_all) / world) / batch)
    node_id = ray.get_runtime_context().get_node_id()
    nodes = [node_id]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, node_id)
        nodes = [str(n) for n in gathered]
    epochs = int(loop_config["epochs"])
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1009 + epoch * 31 + rank)
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for step in range(steps):
            idx = order[(step * batch) % len(x) :][:batch]
            optimizer.zero_grad(set_to_none=True)
            loss = objective_loss(
                model,
                x[idx],
                None if y is None else y[idx],
                objective=objective,
                fraction=fraction,
                generator=generator,
            )
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "nodes": nodes}
        last = epoch == epochs - 1
        if rank == 0:
            inner = net  # DDP wraps the same module object: its weights are net's
            metrics.update(
                _validation_metrics(
                    inner,
                    loop_config["x_val"],
                    loop_config["y_val"],
                    objective=objective,
                    fraction=fraction,
                    seed=seed,
                )
            )
        if rank == 0 and last:
            state = {ENCODER_PREFIX + k: v.detach().cpu() for k, v in net.encoder.state_dict().items()}
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / _CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def _split(
    source: SourceData, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(source.n_rows)
    n_val = max(1, round(fraction * source.n_rows))
    val, train = order[:n_val], order[n_val:]
    y = source.y
    return (
        source.x[train],
        None if y is None else y[train],
        source.x[val],
        None if y is None else y[val],
    )


def _check_resources(config: FedChurnConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    p = config.pretrain
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if p.num_workers * p.cpus_per_worker > cpus:
        raise SimulationError(
            f"pretrain.num_workers ({p.num_workers}) x pretrain.cpus_per_worker ({p.cpus_per_worker:g}) needs "
            f"{p.num_workers * p.cpus_per_worker:g} CPUs; the Ray cluster has {cpus:g}"
        )
    if p.gpus_per_worker > 0 and p.num_workers * p.gpus_per_worker > gpus:
        raise SimulationError(
            f"pretrain.gpus_per_worker = {p.gpus_per_worker:g} for {p.num_workers} workers but the Ray cluster has "
            f"{gpus:g} GPUs: set it to 0 on a machine without a GPU"
        )


def pretrain_encoder(config: FedChurnConfig, *, out_dir: str | Path, ray_address: str | None = None) -> PretrainResult:
    """Pretrain on the configured source with Ray Train; write ``out_dir/encoder.pt`` and ``out_dir/pretrain.json``."""
    from fedchurn.simulation.driver import _connect_ray, quiet_environment
    from fedchurn.simulation.ray_head import own_session_dir, remove_session_dir

    quiet_environment()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = config.pretrain
    source = load_source(config)
    x_train, y_train, x_val, y_val = _split(source, fraction=p.validation_fraction, seed=config.seed)
    loop_config = {
        "model": config.model,
        "objective": p.objective,
        "seed": config.seed,
        "epochs": p.epochs,
        "batch_size": p.batch_size,
        "learning_rate": p.learning_rate,
        "mask_fraction": p.mask_fraction,
        "cpus_per_worker": p.cpus_per_worker,
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
    }
    resources: dict[str, float] = {"CPU": p.cpus_per_worker}
    if p.gpus_per_worker > 0:
        resources["GPU"] = p.gpus_per_worker
    storage = out / _STORAGE_DIR
    started_ray = _connect_ray(config, ray_address=ray_address)
    own = started_ray and not (ray_address or config.simulation.ray_address)  # a local Ray, not a cluster's
    session_dir = own_session_dir() if own else None
    ray_started_at = time.perf_counter()
    try:
        _check_resources(config)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=p.num_workers, use_gpu=p.gpus_per_worker > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(name="pretrain", storage_path=str(storage)),
        )
        result = trainer.fit()
    except SimulationError:
        raise
    except Exception as exc:  # Ray Train wraps worker failures in several types
        raise SimulationError(f"pretraining failed: {exc}") from exc
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        remove_session_dir(session_dir)  # the checkpoint is under `storage`, not in Ray's session folder
    train_seconds = time.perf_counter() - ray_started_at
    if result.checkpoint is None:
        raise SimulationError("pretraining ended without a checkpoint from rank 0")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / _CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    shutil.rmtree(storage, ignore_errors=True)
    arrays = {k: v.numpy() for k, v in state.items()}
    reported = result.metrics or {}
    metrics = {k: v for k, v in reported.items() if k != "nodes"}
    nodes = [str(n) for n in reported.get("nodes", [])]
    metadata: dict[str, Any] = {
        "origin": "pretrain",
        "provenance_version": PROVENANCE_VERSION,
        "objective": p.objective,
        "schema": schema_metadata(source.schema, with_label=p.objective == "supervised"),
        "source": {
            "kind": source.kind,
            "description": source.description,
            "rows": source.n_rows,
            "labelled": source.y is not None,
            "fingerprint": source.fingerprint,
            "file_sha256": source.file_sha256,
        },
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "training": {k: v for k, v in config_to_dict(config)["pretrain"].items() if k != "csv_path"},
        "workers": {"count": p.num_workers, "node_ids": nodes, "distinct_nodes": len(set(nodes))},
        "seconds": {"total": round(time.perf_counter() - started, 3), "ray_and_training": round(train_seconds, 3)},
        "seed": config.seed,
        "versions": library_versions(),
        "privacy": "not differentially private: the source must be public or consented data",
    }
    checkpoint = out / ENCODER_FILE
    save_encoder_checkpoint(
        checkpoint, arrays, model=config.model, feature_names=source.schema.feature_names, metadata=metadata
    )
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return PretrainResult(checkpoint=checkpoint, metadata=metadata, arrays=arrays)
