"""Flower ServerApp: config → shared encoder → strategy → rounds → artifacts. Wiring only."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.report import RunRecorder
from server.strategy import make_strategy
from shared.config import FedChurnConfig, config_from_run_config, config_to_dict, dump_config
from shared.data import derive_seed, resolve_schema
from shared.model import build_model, encoder_arrays, load_encoder_checkpoint, save_encoder_checkpoint
from shared.wire import from_array_record, to_array_record

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ENCODER_FILE = "encoder.pt"


def initial_encoder(config: FedChurnConfig, feature_names: tuple[str, ...]) -> dict[str, Any]:
    """The encoder of round 1: a checked checkpoint when the config names one, else seeded random weights."""
    if config.model.encoder_checkpoint:
        return load_encoder_checkpoint(config.model.encoder_checkpoint, model=config.model, feature_names=feature_names)
    torch.manual_seed(derive_seed(config.seed, "encoder"))
    return encoder_arrays(build_model(config.model, input_dim=len(feature_names)))


def run_federation(grid: Grid, config: FedChurnConfig, *, run_id: int) -> dict[str, Any]:
    """Run every round and write the run's artifacts; returns the summary."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")
    feature_names = resolve_schema(config.data).feature_names
    encoder = initial_encoder(config, feature_names)

    recorder = RunRecorder(output_dir, rounds=config.rounds)
    strategy = make_strategy(config.strategy, observer=recorder, min_available=config.strategy.min_replies)
    result = strategy.start(  # type: ignore[attr-defined]
        grid=grid,
        initial_arrays=to_array_record(encoder),
        num_rounds=config.rounds,
        timeout=config.strategy.round_timeout_s,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=recorder.round_finished,
    )
    final = from_array_record(result.arrays) if len(result.arrays) else encoder
    save_encoder_checkpoint(
        output_dir / ENCODER_FILE,
        final,
        model=config.model,
        feature_names=feature_names,
        metadata={"run_id": run_id, "rounds": recorder.completed_rounds, "origin": "federated"},
    )
    summary = recorder.summary(
        extra={
            "run_id": run_id,
            "seconds": round(time.perf_counter() - started, 3),
            "strategy": config.strategy.name,
            "privacy": {
                "enabled": config.privacy.enabled,
                "unit": "one customer row",
                "accountant": config.privacy.accountant,
                "sampling": "Poisson",
                "composition": "cumulative over every round each institution trained",
                "not_covered": "metrics sent to the server (AUC, loss, counts) are not protected by DP",
            },
            "versions": {
                "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "config": config_to_dict(config),
        }
    )
    recorder.write_summary(summary)
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` binds the run's config (in-process simulation), else Flower's is used."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = config_from_run_config(run_config if run_config is not None else context.run_config)
        run_federation(grid, config, run_id=context.run_id)

    return app


app = make_server_app()  # `flwr run` loads this; it reads the run-config Flower gives it
