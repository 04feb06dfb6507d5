"""`fedchurn pretrain`: the shared encoder pretrained on source data with Ray Train."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedchurn.shared.config import (
    FedChurnConfig,
    apply_overrides,
    default_config,
    load_config,
    parse_override,
    resolve_paths,
)
from fedchurn.shared.errors import ConfigError


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="pretrain the shared encoder on source data with Ray Train",
        description="Pretrain the encoder on a source table (pretrain.source: csv) or the synthetic consortium's "
        "source domain, supervised or self-supervised, and write ENCODER_DIR/encoder.pt with its provenance. "
        "Not differentially private: use public or consented source data only.",
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded demo)")
    parser.add_argument("--out", required=True, metavar="ENCODER_DIR", help="folder for encoder.pt and pretrain.json")
    parser.add_argument("--objective", choices=("supervised", "self_supervised"), help="pretrain.objective")
    parser.add_argument("--source-csv", help="source table with the federation's columns (sets pretrain.source: csv)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (pretrain.num_workers)")
    parser.add_argument("--epochs", type=int, help="pretrain.epochs")
    parser.add_argument("--seed", type=int, help="seed for the source domain, split and weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--ray-address", help="attach to a running Ray cluster ('auto' or host:port)")
    parser.add_argument("--overwrite", action="store_true", help="replace an encoder.pt already in ENCODER_DIR")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    parser.set_defaults(handler=run)


def resolve_pretrain_config(args: argparse.Namespace) -> FedChurnConfig:
    config = load_config(args.config) if args.config else default_config()
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.set)
    for key, value in (
        ("pretrain.objective", args.objective),
        ("pretrain.num_workers", args.workers),
        ("pretrain.epochs", args.epochs),
        ("seed", args.seed),
    ):
        if value is not None:
            overrides[key] = value
    if args.source_csv:
        overrides["pretrain.source"] = "csv"
        overrides["pretrain.csv_path"] = args.source_csv
    if overrides:
        config = resolve_paths(apply_overrides(config, overrides), base_dir=Path.cwd())
    return config


def run(args: argparse.Namespace) -> int:
    """Stage and per-epoch lines (loss, validation metric, elapsed, ETA) on stderr while it trains."""
    from fedchurn.progress import run_with_progress

    return run_with_progress(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from fedchurn.pretraining.trainer import ENCODER_FILE, pretrain_encoder
    from fedchurn.progress import process_started

    config = resolve_pretrain_config(args)
    out = Path(args.out)
    if (out / ENCODER_FILE).exists() and not args.overwrite:
        raise ConfigError("--out", str(out), "already holds an encoder.pt", "choose another folder or --overwrite")
    p = config.pretrain
    print(
        f"Pretraining ({p.objective}) on {p.source if p.source == 'synthetic' else p.csv_path}: {p.epochs} epochs, "
        f"{p.num_workers} Ray Train worker(s); not differentially private (public or consented data only)"
    )
    result = pretrain_encoder(config, out_dir=out, ray_address=args.ray_address)
    meta = result.metadata
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in meta["metrics"].items() if k != "epoch")
    print(f"Source: {meta['source']['description']} (fingerprint {meta['source']['fingerprint'][:12]})")
    print(f"Metrics: {metrics}")
    print(
        f"Workers on {meta['workers']['distinct_nodes']} node(s); took {time.time() - process_started():.1f} s "
        f"since the command started (Ray start-up and training {meta['seconds']['ray_and_training']:.1f} s)"
    )
    print(f"Encoder: {result.checkpoint}")
    print(f"Use it: fedchurn simulate --set model.encoder_checkpoint={result.checkpoint}")
    return 0
