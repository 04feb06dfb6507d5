"""The `fedchurn` command. Parses arguments, calls the library, prints results. Errors: one line, no traceback."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import (
    DEFAULT_CONFIG_YAML,
    FedChurnConfig,
    apply_overrides,
    default_config,
    dump_config,
    load_config,
    parse_override,
    resolve_paths,
)
from shared.errors import ConfigError, FedChurnError

EXIT_USER_ERROR = 2
RUN_MARKERS = ("summary.json", "rounds.jsonl")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedchurn",
        description="Federated transfer learning for bank churn: shared encoder, local heads, DP-SGD.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser(
        "simulate",
        help="run a simulated federation of institutions on Ray",
        description="Run a federation of simulated institutions. With no CONFIG, runs the embedded default: "
        "a synthetic consortium of six banks.",
    )
    sim.add_argument("config", nargs="?", help="YAML config (default: the embedded demo; see 'fedchurn config show')")
    sim.add_argument("--out", help="output folder (default: the config's output_dir)")
    sim.add_argument("--rounds", type=int, help="number of federated rounds")
    sim.add_argument("--seed", type=int, help="seed for data splits, initial weights, sampling and noise")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set privacy.noise_multiplier=1.3 (repeatable)",
    )
    quick = sim.add_argument_group("quick start from one CSV (column types are inferred)")
    quick.add_argument("--data", help="CSV with one row per customer")
    quick.add_argument("--label", help="the churn column")
    quick.add_argument("--positive", help="the label value meaning churned (default: 1/yes/true)")
    quick.add_argument("--institution-column", help="the column naming each row's institution")
    quick.add_argument("--drop", default="", help="comma-separated columns to ignore (identifiers, leaky columns)")
    quick.add_argument("--save-config", help="write the resulting config as YAML to this file, to edit and reuse")
    sim.add_argument("--ray-address", help="attach to a running Ray cluster ('auto' or host:port)")
    sim.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds an earlier run")
    sim.add_argument("--dry-run", action="store_true", help="check config and data, print the plan, do not train")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")

    cfg = commands.add_parser("config", help="show or check configs")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cfg_commands.add_parser("show", help="print the embedded default config (a template to edit)")
    check = cfg_commands.add_parser("check", help="validate a config file and print it resolved")
    check.add_argument("config")
    return parser


def _quick_start_config(args: argparse.Namespace, base: FedChurnConfig) -> FedChurnConfig:
    from shared.data import infer_schema

    missing = [
        flag
        for flag, value in (("--label", args.label), ("--institution-column", args.institution_column))
        if not value
    ]
    if missing:
        raise ConfigError("--data", args.data, f"also needs {' and '.join(missing)}")
    drop = _expand_columns(args.data, [c.strip() for c in args.drop.split(",") if c.strip()])
    inferred = infer_schema(
        args.data, label=args.label, positive=args.positive, institution_column=args.institution_column, drop=drop
    )
    print(f"Columns of {args.data}:")
    for line in inferred.report:
        print(f"  {line}")
    data = dataclasses.replace(
        base.data,
        source="csv",
        csv_path=str(Path(args.data).expanduser().resolve()),
        institution_column=args.institution_column,
        institution_files={},
        schema=inferred.schema,
    )
    return dataclasses.replace(base, data=data)


def _expand_columns(path: str, patterns: list[str]) -> tuple[str, ...]:
    """``--drop CLIENTNUM,Naive_Bayes*``: shell-style patterns matched against the CSV's header."""
    if not any(ch in p for p in patterns for ch in "*?["):
        return tuple(patterns)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except OSError:
        return tuple(patterns)  # the checked reader reports the problem with the file
    names: list[str] = []
    for pattern in patterns:
        matched = fnmatch.filter(header, pattern) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matched:
            raise ConfigError("--drop", pattern, f"matches no column of {path}")
        names.extend(m for m in matched if m not in names)
    return tuple(names)


def _resolve_config(args: argparse.Namespace) -> FedChurnConfig:
    config = load_config(args.config) if args.config else default_config()
    if args.data:
        config = _quick_start_config(args, config)
    elif any((args.label, args.positive, args.institution_column)):
        raise ConfigError("--label", args.label, "--label/--positive/--institution-column need --data FILE.csv")
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.set)
    for key, value in (("rounds", args.rounds), ("seed", args.seed), ("output_dir", args.out)):
        if value is not None:
            overrides[key] = value
    if overrides:
        # Paths given on the command line are relative to where the command runs.
        config = resolve_paths(apply_overrides(config, overrides), base_dir=Path.cwd())
    if args.save_config:
        Path(args.save_config).write_text(dump_config(config), encoding="utf-8")
        print(f"Config written to {args.save_config}")
    return config


def _check_output_dir(config: FedChurnConfig, *, overwrite: bool) -> None:
    out = Path(config.output_dir)
    earlier = [m for m in RUN_MARKERS if (out / m).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            "output_dir",
            str(out),
            "already holds an earlier run",
            "choose another folder with --out, or pass --overwrite to replace its results",
        )


def _format_table(summary: dict[str, Any]) -> str:
    header = (
        f"{'institution':<22} {'n_train':>7} {'n_test':>6} {'AUC':>6} {'PR-AUC':>6} {'Brier':>6} {'acc':>6} {'ε':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, m in summary["institutions"].items():
        epsilon = m["epsilon"]
        eps_text = "off" if epsilon is None else f"{epsilon:.3f}"
        lines.append(
            f"{name[:22]:<22} {m['n_train']:>7d} {m['n_test']:>6d} {m['auc']:>6.3f} {m['pr_auc']:>6.3f} "
            f"{m['brier']:>6.3f} {m['accuracy']:>6.3f} {eps_text:>7}"
        )
    return "\n".join(lines)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from shared.simulation import plan_simulation, run_simulation

    config = _resolve_config(args)
    _check_output_dir(config, overwrite=args.overwrite)
    plan = plan_simulation(config)
    privacy = config.privacy
    dp = (
        f"DP-SGD (C={privacy.clipping_norm}, "
        + (
            f"σ={privacy.noise_multiplier}"
            if privacy.noise_multiplier is not None
            else f"target ε={privacy.target_epsilon}"
        )
        + f", δ={privacy.delta}, {privacy.accountant})"
        if privacy.enabled
        else "no DP"
    )
    print(
        f"Federation: {len(plan.institutions)} institutions, {config.rounds} rounds, {config.strategy.name}, {dp}; "
        f"output {plan.config.output_dir}"
    )
    if args.dry_run:
        print("Institutions: " + ", ".join(plan.institutions))
        return 0
    summary = run_simulation(plan, ray_address=args.ray_address, verbose=args.verbose)
    print()
    print(_format_table(summary))
    delta = config.privacy.delta
    if config.privacy.enabled:
        print(f"\nε: cumulative over all {summary['rounds']} rounds, per customer row, δ = {delta}.")
    if summary["dropped_replies"]:
        print(
            f"{len(summary['dropped_replies'])} replies were dropped; reasons in {plan.config.output_dir}/rounds.jsonl"
        )
    print(f"Run took {summary['seconds']:.1f} s. Results: {plan.config.output_dir}/summary.json")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "show":
        print(DEFAULT_CONFIG_YAML, end="")
        return 0
    config = load_config(args.config)
    print(dump_config(config), end="")
    return 0


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress = logging.getLogger("fedchurn.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("server", "clients", "shared"):
        logger = logging.getLogger(name)
        logger.addHandler(warnings)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "config":
            return _cmd_config(args)
    except FedChurnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
