"""Flower ServerApp: config → shared encoder → strategy → rounds → artifacts. Wiring only."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedchurn.server.app_logging import log_through_flower
from fedchurn.server.privacy_oversight import PrivacyOversight
from fedchurn.server.report import RunRecorder
from fedchurn.server.resume import ResumableRun, check_new_run_folder
from fedchurn.server.strategy import make_strategy
from fedchurn.server.tracking import start_tracking
from fedchurn.server.warmup import warm_up_nodes
from fedchurn.shared.bank_random import derive_seed
from fedchurn.shared.config import FedChurnConfig, config_from_run_config, config_to_dict, dump_config
from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.institution_rows import resolve_schema
from fedchurn.shared.model import build_model, encoder_arrays, save_encoder_checkpoint
from fedchurn.shared.provenance import library_versions, load_checked_encoder
from fedchurn.shared.sharing import initial_shared_arrays, save_global_head, split_shared
from fedchurn.shared.wire import from_array_record, to_array_record

logger = logging.getLogger(__name__)
progress = logging.getLogger("fedchurn.progress")  # stage lines; the CLI shows them (fedchurn/progress.py)

CONFIG_FILE = "config.yaml"
ENCODER_FILE = "encoder.pt"


def initial_encoder(config: FedChurnConfig, feature_names: tuple[str, ...]) -> dict[str, Any]:
    """The encoder of round 1: a checked checkpoint when the config names one, else seeded random weights."""
    if config.model.encoder_checkpoint:
        return load_checked_encoder(config, feature_names)  # weights, schema and provenance checked
    torch.manual_seed(derive_seed(config.seed, "encoder"))
    return encoder_arrays(build_model(config.model, input_dim=len(feature_names)))


def run_federation(
    grid: Grid,
    config: FedChurnConfig,
    *,
    run_id: int,
    members: Mapping[int, str] | None = None,
    refuse_existing: bool = True,
    stop: threading.Event | None = None,
    warm_up: int = 0,
) -> dict[str, Any]:
    """Run every round and write the run's artifacts; returns the summary.

    A new run (not ``federation.resume``) refuses an ``output_dir`` holding an earlier run unless
    ``refuse_existing`` is False (``fedchurn simulate --overwrite`` decides that itself). When ``stop`` is set
    the run ends after the round under way, once it is checkpointed (:class:`server.resume.RunInterrupted`).

    ``members`` maps each node id to the institution registered for it (a simulation's partitions); by default
    the config's ``federation.members``. Without either, replies are taken at their word, with a warning.

    ``warm_up`` > 0 (a simulation: its number of nodes): before round 1, wait for that many nodes and send each an
    empty warm-up query (server/warmup.py), so round 1 does not pay for every worker's first-message costs.
    """
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    if refuse_existing and not config.federation.resume:
        check_new_run_folder(output_dir)
    feature_names = resolve_schema(config.data).feature_names
    encoder = initial_encoder(config, feature_names)
    # Read and check everything a resume needs before anything in the folder is written (the recorder truncates
    # rounds.jsonl): a bad checkpoint is refused, naming the file, with the folder as it was.
    resumable = ResumableRun.prepare(config, output_dir, flower_run_id=run_id)
    resumable.stop = stop
    start_arrays = resumable.arrays_or(initial_shared_arrays(config, encoder, input_dim=len(feature_names)))
    run_identity = config.federation.identity(run_id)  # survives a server restart; Flower's run id does not
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(dump_config(config, relative_to=output_dir), encoding="utf-8")

    tracker = start_tracking(config, output_dir, run_name=run_identity)  # tracking.backend; None when 'none'
    recorder = RunRecorder(
        output_dir,
        rounds=config.rounds,
        tracker=tracker,
        announce_sigma=config.privacy.enabled and config.privacy.noise_multiplier is None,
    )
    if members is None and config.federation.members:
        members = {int(node): name for node, name in config.federation.members.items()}
    if members is None:
        logger.warning(
            "no member registry (federation.members): replies are attributed to the institution they name; "
            "register each bank's key with fedchurn federation register ... --institution NAME"
        )
    strategy = make_strategy(
        config.strategy,
        observer=recorder,
        min_available=config.strategy.min_replies,
        transfer_mode=config.transfer.mode,
        members=members,
    )
    if warm_up > 0:
        _stage(f"starting {warm_up} institution workers (each loads its rows and warms up)")
        warm_up_nodes(grid, expected=warm_up, timeout=config.strategy.round_timeout_s)
    _stage(f"training round {resumable.completed_before + 1}/{config.rounds}")
    oversight = PrivacyOversight(
        config, output_dir, run_id=run_identity, completed_round=resumable.completed_before
    )  # declines, consortium ledger, institution DP
    result = resumable.attach(recorder, oversight.wrap(strategy)).start(
        grid=grid,
        initial_arrays=to_array_record(start_arrays),
        num_rounds=resumable.remaining_rounds,
        timeout=config.strategy.round_timeout_s,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=resumable.round_finished,  # the recorder's end of round, then the server checkpoint
    )
    _stage("saving the encoder and the summary")
    final = from_array_record(result.arrays) if len(result.arrays) else start_arrays
    final, global_head = split_shared(final)  # the head is shared only in transfer.mode 'fedavg'
    if global_head:
        save_global_head(output_dir, global_head)
    save_encoder_checkpoint(
        output_dir / ENCODER_FILE,
        final,
        model=config.model,
        feature_names=feature_names,
        metadata={
            "run_id": run_identity,
            "rounds": recorder.completed_rounds,
            "origin": "federated",
            "transfer_mode": config.transfer.mode,
        },
    )
    summary = recorder.summary(
        extra={
            "run_id": run_identity,
            "flower_run_id": run_id,
            "seconds": round(time.perf_counter() - started, 3),
            "strategy": config.strategy.name,
            **oversight.summary(),  # budget (who stopped, when, at what ε), institution_dp, consortium_ledger
            "privacy": {
                "enabled": config.privacy.enabled,
                "unit": "one customer row",
                "accountant": config.privacy.accountant,
                "sampling": "Poisson",
                "composition": "lifetime: every mechanism each bank ran on the same rows, across runs (its own ledger)",
                "evaluation": "metrics are computed from score histograms released with Gaussian noise and accounted "
                "in each bank's ε (evaluation.mode dp), or not sent at all (off)",
                "not_covered": "whether a bank replied or declined and its code; the ceil(n/B) that epsilon reveals",
            },
            "versions": library_versions(),
            "config": config_to_dict(config),
        }
    )
    recorder.write_summary(summary)
    return summary


def _stage(text: str) -> None:
    progress.info("%s", text, extra={"progress_stage": text})


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    *,
    members: Mapping[int, str] | None = None,
    stop: threading.Event | None = None,
    warm_up: int = 0,
) -> ServerApp:
    """A ServerApp; ``run_config`` binds the run's config (in-process simulation), else Flower's is used.
    ``members``: node id -> institution, filled by the simulation as it creates its nodes; ``stop``: set to end
    the run after the round under way (the simulation's Ctrl-C); ``warm_up``: the simulation's number of nodes, to
    warm up before round 1 (0: none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = config_from_run_config(run_config if run_config is not None else context.run_config)
        # A simulation (run_config bound) checks its folder (simulate --overwrite) and its outcome itself.
        real = run_config is None
        if real:
            log_through_flower()  # `flwr run`: one line per round, printed once, among Flower's
        summary = run_federation(
            grid, config, run_id=context.run_id, members=members, refuse_existing=real, stop=stop, warm_up=warm_up
        )
        if real and not summary["institutions"]:
            reasons = "; ".join(f"{d['institution']}: {d['reason']}" for d in summary["dropped_replies"][:5])
            raise FedChurnError(f"no institution completed a round ({reasons or 'no replies'})")

    return app


app = make_server_app()  # `flwr run` loads this; it reads the run-config Flower gives it
