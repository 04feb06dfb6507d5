"""`fedchurn run`: submit a run of our Flower app to a real federation, with a YAML config."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedchurn.deployment.federation import default_flwr_home, submit_run
from fedchurn.deployment.members import read_members
from fedchurn.shared.config import (
    FedChurnConfig,
    apply_overrides,
    config_to_run_config,
    default_config,
    load_config,
    parse_override,
    resolve_paths,
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the federated training on a real federation (SuperLink + institutions' SuperNodes)",
        description="The YAML config becomes Flower's run-config; the server writes its results to the config's "
        "output_dir on the SuperLink's machine (relative paths: relative to the SuperLink's working folder).",
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
    parser.add_argument("--federation", required=True, help="the SuperLink connection (fedchurn federation connect)")
    parser.add_argument(
        "--run-name",
        help="the run's identity at every bank (default: a new one, printed); give it again with --resume",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run --run-name from its last completed round"
    )
    parser.add_argument("--out", help="output folder on the SuperLink's machine (made absolute here)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--flwr-home", help="Flower's config folder (default: $FLWR_HOME or ~/.flwr)")
    parser.add_argument("--timeout", type=float, help="stop the run if it has not ended after this many seconds")
    parser.add_argument("--quiet", action="store_true", help="do not show Flower's log of the run")
    parser.set_defaults(handler=run)


def resolve_federated_config(args: argparse.Namespace, members: Mapping[int, str]) -> FedChurnConfig:
    """The run's config; ``members`` (node id -> institution, the registry) unless the config lists its own."""
    config = load_config(args.config) if args.config else default_config()
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.set)
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.out is not None:
        overrides["output_dir"] = str(Path(args.out).expanduser().resolve())
    run_name = args.run_name or config.federation.run_name
    if run_name is None and not args.resume:
        run_name = dt.datetime.now(dt.UTC).strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    overrides["federation.run_name"] = run_name
    overrides["federation.resume"] = bool(args.resume or config.federation.resume)
    if not config.federation.members:
        overrides["federation.members"] = {str(node): name for node, name in sorted(members.items())}
    return resolve_paths(apply_overrides(config, overrides), base_dir=Path.cwd())


def run(args: argparse.Namespace) -> int:
    flwr_home = Path(args.flwr_home).expanduser().resolve() if args.flwr_home else default_flwr_home()
    config = resolve_federated_config(args, read_members(flwr_home, args.federation))
    if not config.federation.members:
        print(
            f"error: no institution is registered for federation '{args.federation}', so the server could not tell "
            "which bank sent a reply. Register each bank's key with its name first: fedchurn federation register "
            f"{args.federation} --key BANK/node-auth.pub --institution BANK"
        )
        return 1
    if not config.federation.resume:
        from fedchurn.server.resume import check_new_run_folder

        check_new_run_folder(Path(config.output_dir))  # when the folder is on this machine; the server checks too
    verb = "Resuming" if config.federation.resume else "Starting"
    print(
        f"{verb} run '{config.federation.run_name}' on federation '{args.federation}': {config.rounds} rounds, "
        f"{config.strategy.name}, min {config.strategy.min_replies} replies, round timeout "
        f"{config.strategy.round_timeout_s:g} s; results in {config.output_dir} on the SuperLink's machine"
    )
    summary_path = Path(config.output_dir) / "summary.json"
    outcome = submit_run(
        flwr_home,
        args.federation,
        config_to_run_config(config),
        timeout_s=args.timeout,
        on_line=None if args.quiet else print,
    )
    if outcome.status != "finished:completed":
        print(f"error: run {outcome.run_id or '-'} {outcome.status}: {outcome.details}")
        again = " ".join(
            part
            for part in (
                "fedchurn run",
                shlex.quote(args.config) if args.config else None,
                f"--federation {args.federation}",
                f"--rounds {args.rounds}" if args.rounds is not None else None,
                *(f"--set {shlex.quote(item)}" for item in args.set),
                f"--out {shlex.quote(config.output_dir)}",
                f"--run-name {config.federation.run_name} --resume",
                f"--flwr-home {args.flwr_home}" if args.flwr_home else None,
            )
            if part
        )
        print(f"To continue it from its last completed round: {again}")
        return 130 if outcome.status == "interrupted" else 1
    print(f"\nRun {outcome.run_id} ('{config.federation.run_name}') completed.")
    if summary_path.is_file():  # the SuperLink runs on this machine: show the results
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not summary.get("institutions"):
            print(f"error: no institution completed a round; reasons in {config.output_dir}/rounds.jsonl")
            return 1
        from fedchurn.cli.simulate import _format_table, noise_floor

        print(_format_table(summary, floor=noise_floor(config)))
        dropped = summary.get("dropped_replies", [])
        print(
            f"\n{summary['rounds']} rounds; seconds per round {summary['seconds_per_round']}; "
            f"{len(dropped)} replies dropped (reasons in {config.output_dir}/rounds.jsonl)"
        )
    else:
        print(f"Results: {config.output_dir} on the SuperLink's machine.")
    return 0
