"""`fedchurn simulate`, and the run inputs other commands share (a config, or --data quick start)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fnmatch
import math
import secrets
import time
from pathlib import Path
from typing import Any

from fedchurn.cli.privacy_cmd import budget_lines
from fedchurn.shared.config import (
    FedChurnConfig,
    apply_overrides,
    default_config,
    dump_config,
    load_config,
    parse_override,
    resolve_paths,
)
from fedchurn.shared.errors import ConfigError

RUN_MARKERS = ("summary.json", "rounds.jsonl")


def add_run_inputs(
    parser: argparse.ArgumentParser, *, out_help: str = "output folder (default: the config's output_dir)"
) -> None:
    """The arguments that say what to run: a config (or the default), overrides, or the --data quick start."""
    parser.add_argument(
        "config", nargs="?", help="YAML config (default: the embedded demo; see 'fedchurn config show')"
    )
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--rounds", type=int, help="number of federated rounds")
    parser.add_argument("--seed", type=int, help="seed for data splits, initial weights, sampling and noise")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set privacy.noise_multiplier=1.3 (repeatable)",
    )
    quick = parser.add_argument_group("quick start from one CSV (column types are inferred)")
    quick.add_argument("--data", help="CSV (or .parquet) with one row per customer")
    quick.add_argument("--label", help="the churn column")
    quick.add_argument("--positive", help="the label value meaning churned (default: 1/yes/true)")
    quick.add_argument("--institution-column", help="the column naming each row's institution")
    quick.add_argument(
        "--drop", default="", help="comma-separated columns to ignore; shell patterns allowed (Naive_Bayes*)"
    )
    quick.add_argument(
        "--allow-leaky",
        default="",
        help="comma-separated columns to keep although each nearly determines the label (default: an error)",
    )
    quick.add_argument("--save-config", help="write the resulting config as YAML to this file, to edit and reuse")
    parser.add_argument("--ray-address", help="attach to a running Ray cluster ('auto' or host:port)")
    parser.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds an earlier run")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")


def _quick_start_config(args: argparse.Namespace, base: FedChurnConfig) -> FedChurnConfig:
    from fedchurn.schema_inference import infer_schema

    missing = [
        flag
        for flag, value in (("--label", args.label), ("--institution-column", args.institution_column))
        if not value
    ]
    if missing:
        raise ConfigError("--data", args.data, f"also needs {' and '.join(missing)}")
    drop = _expand_columns(args.data, [c.strip() for c in args.drop.split(",") if c.strip()])
    allow_leaky = tuple(c.strip() for c in args.allow_leaky.split(",") if c.strip())
    inferred = infer_schema(
        args.data,
        label=args.label,
        positive=args.positive,
        institution_column=args.institution_column,
        drop=drop,
        allow_leaky=allow_leaky,
    )
    print(f"Columns of {args.data}:")
    for line in inferred.report:
        print(f"  {line}")
    for line in inferred.warnings:
        print(f"Warning: {line}")
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
    from fedchurn.shared.table_io import read_header

    header = list(read_header(path))  # CSV or Parquet; a bad file is reported with its fix
    names: list[str] = []
    for pattern in patterns:
        matched = fnmatch.filter(header, pattern) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matched:
            raise ConfigError("--drop", pattern, f"matches no column of {path}")
        names.extend(m for m in matched if m not in names)
    return tuple(names)


def resolve_run_config(args: argparse.Namespace) -> FedChurnConfig:
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
        Path(args.save_config).write_text(
            dump_config(config, relative_to=Path(args.save_config).parent), encoding="utf-8"
        )
        print(f"Config written to {args.save_config}")
    return config


def check_output_dir(config: FedChurnConfig, *, overwrite: bool) -> None:
    out = Path(config.output_dir)
    earlier = [m for m in RUN_MARKERS if (out / m).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            "output_dir",
            str(out),
            "already holds an earlier run",
            "choose another folder with --out, or pass --overwrite to replace its results",
        )


def _number(value: Any, width: int, digits: int = 3) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def noise_floor(config: FedChurnConfig) -> float:
    """The fewest churned (or retained) test customers a release needs before its metrics say more than its noise:
    3 standard deviations of a class's noisy total, 3·σ_e·√bins, at the σ_e the run asks for (a bank's policy
    may raise it, which only raises the floor)."""
    sigma = max(config.evaluation.noise_multiplier, config.policy.evaluation_noise_multiplier)
    return 3.0 * sigma * math.sqrt(config.evaluation.bins)


def _format_table(summary: dict[str, Any], *, floor: float | None = None) -> str:
    """Last released metrics per bank, and the round, AUC and ECE of the model each bank keeps.

    With ``floor`` (:func:`noise_floor`), a bank whose noisy test release holds fewer churned or retained customers
    than that is marked ``~``: its figures are mostly noise (the default demo's smallest banks)."""
    if not summary["institutions"]:
        return "No evaluation statistics left the institutions (evaluation off, or none allowed by their budgets)."
    header = (
        f"{'institution':<22} {'n_train':>7} {'n_test':>6} {'AUC':>6} {'PR-AUC':>6} {'Brier':>6} {'ECE':>6} "
        f"{'kept@':>5} {'AUC':>6} {'ECE':>6} {'ε':>7}"
    )
    lines = [header, "-" * len(header)]
    noisy = 0
    for name, m in summary["institutions"].items():
        epsilon = m["epsilon"]
        eps_text = "off" if epsilon is None else f"{epsilon:.3f}"
        kept = m.get("model_round")
        mark = " "
        if floor is not None and _below_floor(m, floor):
            mark = "~"
            noisy += 1
        lines.append(
            f"{name[:21]:<21}{mark} {m['n_train'] or '-':>7} {m['n_test']:>6d} "
            f"{_number(m['auc'], 6)} {_number(m['pr_auc'], 6)} "
            f"{_number(m['brier'], 6)} {_number(m.get('ece'), 6)} {'-' if kept is None else kept:>5} "
            f"{_number(m.get('model_auc'), 6)} {_number(m.get('model_ece'), 6)} {eps_text:>7}"
        )
    lines.append(
        "Metrics come from DP-noised score histograms (n_test is noisy; n_train '-': withheld by the bank's "
        "policy); ECE: expected calibration error of the "
        "calibrated probabilities. kept@: the round of the model each bank keeps (best DP validation AUC), used by "
        "'fedchurn predict'."
    )
    if noisy and floor is not None:
        lines.append(
            f"~: fewer than {floor:.0f} churned or retained customers in the noisy test release (3·σ_e·√bins): "
            "these figures are mostly evaluation noise; the bank's own exact view is its kept model "
            "(fedchurn predict on labelled rows)."
        )
    return "\n".join(lines)


def _below_floor(metrics: dict[str, Any], floor: float) -> bool:
    count, rate = metrics.get("n_test"), metrics.get("churn_rate")
    if count is None or rate is None:
        return True  # nothing to judge by: a class the noise emptied
    churned = float(count) * float(rate)
    return min(churned, float(count) - churned) < floor


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "simulate",
        help="run a simulated federation of institutions on Ray",
        description="Run a federation of simulated institutions. With no CONFIG, runs the embedded default: "
        "a synthetic consortium of six banks.",
    )
    add_run_inputs(parser)
    parser.add_argument("--dry-run", action="store_true", help="check config and data, print the plan, do not train")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last completed round, with its own config (more rounds: "
        "--rounds N); 'fedchurn runs' lists runs",
    )
    parser.set_defaults(handler=run)


def _encoder_text(config: FedChurnConfig) -> str:
    checkpoint = config.model.encoder_checkpoint
    return f"pretrained checkpoint {checkpoint}" if checkpoint else f"random init (seed {config.seed})"


def _format_bank_plans(plans: list[Any], config: FedChurnConfig) -> str:
    """The --dry-run table: one line per institution (fedchurn/simulation/dry_run.BankPlan)."""
    header = (
        f"{'institution':<22} {'train':>6} {'val':>5} {'test':>5} {'batch':>5} {'q':>7} {'steps/rd':>8} "
        f"{'σ':>7} {'ε spent':>7} {'ε after':>7}"
    )
    lines = [header, "-" * len(header)]
    for p in plans:
        sigma = "-" if p.noise_multiplier is None else f"{p.noise_multiplier:.3f}"
        projected = "-" if p.projected_epsilon is None else f"{p.projected_epsilon:.3f}"
        lines.append(
            f"{p.name[:22]:<22} {p.n_train:>6} {p.n_val:>5} {p.n_test:>5} {p.batch_size:>5} {p.sample_rate:>7.4f} "
            f"{p.steps_per_round:>8} {sigma:>7} {p.spent_epsilon:>7.3f} {projected:>7}"
            + (f"  {p.note}" if p.note else "")
        )
    if config.privacy.enabled:
        lines.append(
            f"ε after: each bank's lifetime ε (δ = {config.privacy.delta:g}, {config.privacy.accountant}) once all "
            f"{config.rounds} rounds and its planned evaluation releases are done, from its training rows n alone "
            "(as the bank plans it); ε spent: already in its ledger. Rows: a split by the config's seed; each bank "
            "splits with its own secret key, so its counts (and ε) differ a little."
        )
    return "\n".join(lines)


def resume_run_config(args: argparse.Namespace) -> FedChurnConfig:
    """--resume RUN_DIR: the run's own config.yaml, with --rounds and --set applied (fedchurn/api/folders.py)."""
    from fedchurn.api.folders import resume_config

    given = [flag for flag, value in (("CONFIG", args.config), ("--data", args.data), ("--out", args.out)) if value]
    if given:
        raise ConfigError(
            "--resume",
            args.resume,
            f"continues the run with its own config and folder, so {', '.join(given)} cannot be given",
            "drop them; change the number of rounds with --rounds N",
        )
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.set)
    for key, value in (("rounds", args.rounds), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    return resume_config(args.resume, overrides)


def run(args: argparse.Namespace) -> int:
    """Stage lines and round lines with ETAs on stderr while the command runs (fedchurn/progress.py)."""
    from fedchurn.progress import run_with_progress

    return run_with_progress(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from fedchurn.progress import process_started, report_stage

    config = resume_run_config(args) if args.resume else resolve_run_config(args)
    if config.federation.run_name is None:  # a name makes the run resumable, with every institution's ε
        name = dt.datetime.now(dt.UTC).strftime("sim-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        config = apply_overrides(config, {"federation.run_name": name})
    if not config.federation.resume:
        check_output_dir(config, overwrite=args.overwrite)
    report_stage("loading the simulation code")
    from fedchurn.server.resume import RunInterrupted
    from fedchurn.simulation.driver import discard_plan, plan_simulation, run_simulation

    plan = plan_simulation(config)
    if config.strategy.min_replies > len(plan.institutions):
        raise ConfigError(
            "strategy.min_replies",
            config.strategy.min_replies,
            f"exceeds the {len(plan.institutions)} institutions of this simulation: no round could complete",
            f"set it to at most {len(plan.institutions)}",
        )
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
    print(f"Transfer: {config.transfer.mode}; encoder: {_encoder_text(config)}")
    if args.dry_run:
        report_stage("loading the institutions' training and accounting code")
        from fedchurn.simulation.dry_run import plan_banks

        try:
            plans = plan_banks(plan.config, plan.institutions)
        finally:
            discard_plan(plan)
        print("Institutions: " + ", ".join(plan.institutions))
        print(_format_bank_plans(plans, config))
        return 0
    try:
        summary = run_simulation(plan, ray_address=args.ray_address, verbose=args.verbose)
    except RunInterrupted as stopped:
        out = plan.config.output_dir
        print(f"\nStopped after round {stopped.completed_round} of {config.rounds}; it is checkpointed in {out}.")
        print(f"To continue: fedchurn simulate --resume {out}")
        return 130
    print()
    print(_format_table(summary, floor=noise_floor(config)))
    delta = config.privacy.delta
    if config.privacy.enabled:
        print(
            f"\nε: each bank's lifetime ε on its rows (every round it trained and every evaluation release, in this and"
            f" earlier runs on the same rows), per customer row, δ = {delta}."
        )
    for line in budget_lines(summary):  # institutions stopped by their privacy budget: who, when, at what ε
        print(line)
    if summary["dropped_replies"]:
        print(
            f"{len(summary['dropped_replies'])} replies were dropped; reasons in {plan.config.output_dir}/rounds.jsonl"
        )
    took = time.time() - process_started()
    rounds_seconds = sum(summary.get("seconds_per_round") or [])
    print(
        f"Run took {took:.1f} s (wall time since the command started: start-up, data checks, Ray and workers, "
        f"{summary['rounds']} rounds ({rounds_seconds:.1f} s), saving). Results: {plan.config.output_dir}/summary.json"
    )
    if (Path(plan.config.output_dir) / "report.html").is_file():
        print(f"Report: {plan.config.output_dir}/report.html")
    return 0
