"""`fedchurn split CONFIG --out DIR`: each institution's train / validation / test rows, as a run splits them."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "split",
        help="export each institution's train/validation/test rows exactly as a run splits them",
        description="Write DIR/<institution>/{train,validation,test}.csv (or .parquet) and DIR/split.json. Each "
        "row's part is decided by the bank's secret key: for a simulation, the key in <output_dir>/institutions/"
        "<name> (created there if absent, and then used by the next simulation in that output_dir); for a bank "
        "exporting its own split, the key in its state folder (--state-dir, with --institution). The files hold "
        "customers' rows: they stay with their owner (mode 0600); nothing is sent anywhere.",
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded demo)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the exported parts")
    parser.add_argument("--institution", action="append", default=[], help="export only this institution (repeatable)")
    parser.add_argument("--state-dir", help="a bank's own state folder (its SuperNode's state-dir): its key")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", help="file format (default: csv)")
    parser.add_argument("--seed", type=int, help="seed (synthetic data; the reproducible split)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in DIR")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedchurn.api.split import export_split
    from fedchurn.shared.config import apply_overrides, default_config, load_config, parse_override, resolve_paths

    config = load_config(args.config) if args.config else default_config()
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if overrides:
        config = resolve_paths(apply_overrides(config, overrides), base_dir=Path.cwd())
    result = export_split(
        config,
        out=args.out,
        institutions=args.institution or None,
        state_dir=args.state_dir,
        format=args.format,
        overwrite=args.overwrite,
    )
    print(f"{'institution':<22} {'part':<10} {'rows':>7} {'churned':>7}")
    for row in result.files.itertuples():
        churned = "-" if row.churned is None else str(row.churned)
        print(f"{row.institution[:22]:<22} {row.part:<10} {row.rows:>7} {churned:>7}")
    for name, source in result.key_source.items():
        print(f"{name}: split with {source}")
    print(f"Written to {result.out_dir} (manifest: split.json). These are customers' rows: keep them private.")
    return 0
