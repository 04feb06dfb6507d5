"""`fedchurn compare`: the transfer modes and a bank's baselines side by side, at one target ε, over seeds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedchurn.cli.simulate import add_run_inputs, resolve_run_config

DEFAULT_OUT = "fedchurn-compare"


def _planned(config: Any) -> Any:
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.shared.dp_planning import plan_consortium
    from fedchurn.shared.institution_rows import institution_names

    names = institution_names(config.data, seed=config.seed)
    sizes = [len(prepare_institution(config, name).y_train) for name in names]  # row counts only
    planned = plan_consortium(config, sizes=sizes)
    t = planned.training
    print(
        f"Planned for ε = {config.privacy.target_epsilon:g} (median bank of {sorted(sizes)}): expected batch "
        f"{t.batch_size}, {t.local_epochs} epoch(s) per round x {config.rounds} rounds, {t.optimizer} at "
        f"learning rate {t.learning_rate:g}, clipping norm {planned.privacy.clipping_norm:g}"
    )
    return planned


def register(commands: Any) -> None:
    from fedchurn.comparison.runner import COMPARE_MODES

    parser = commands.add_parser(
        "compare",
        help="run the transfer modes and each bank's baselines on identical splits, at one target ε, over seeds",
        description="Run every listed mode on the same data and splits, at the same target ε per institution "
        "(σ derived per mode), for several seeds; write DIR/comparison.json, comparison.md and comparison.png "
        "(mean and 95% confidence interval over seeds). 'centralized', 'logreg' and 'hgb' use no differential "
        "privacy. All federated runs share one local Ray.",
    )
    add_run_inputs(
        parser,
        out_help=f"output folder (default: {DEFAULT_OUT}, in the current folder; the config's output_dir is not used)",
    )
    parser.add_argument(
        "--modes",
        help=f"comma-separated modes among {','.join(COMPARE_MODES)} (default: all; frozen only with "
        "model.encoder_checkpoint)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, from --seed upwards (default: 3)")
    parser.add_argument(
        "--target-epsilon",
        type=float,
        help="ε per customer row for the whole run, every private mode (default: privacy.target_epsilon, else 3)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="choose batch size, epochs, learning rate and clipping for the target ε from the institutions' row "
        "counts (shared/dp_planning.py) instead of the config's training settings",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedchurn.comparison.report import markdown_table
    from fedchurn.comparison.runner import DEFAULT_TARGET_EPSILON, plan_comparison, run_comparison

    config = resolve_run_config(args)
    plan = plan_comparison(
        config,
        modes=args.modes,
        seeds=args.seeds,
        target_epsilon=args.target_epsilon,
        output_dir=Path(args.out or DEFAULT_OUT),
        overwrite=args.overwrite,
        out_key="--out",
        overwrite_hint="--overwrite",
    )
    if plan.target_defaulted:
        print(
            f"The config fixes σ = {config.privacy.noise_multiplier}, which gives each mode a different ε; "
            f"comparing at one target ε = {DEFAULT_TARGET_EPSILON:g} instead (--target-epsilon to choose)"
        )
    config = _planned(plan.config) if args.plan else plan.config
    modes, seeds, out = plan.modes, plan.seeds, plan.output_dir
    checkpoint = config.model.encoder_checkpoint
    print(
        f"Comparing {', '.join(modes)} at target ε = {config.privacy.target_epsilon:g} per institution, "
        f"seeds {', '.join(str(s) for s in seeds)}; encoder checkpoint: {checkpoint or 'none (random encoder)'}"
    )
    comparison = run_comparison(
        config,
        modes=modes,
        seeds=seeds,
        output_dir=out,
        ray_address=args.ray_address,
        verbose=args.verbose,
        on_run=lambda mode, seed, seconds: print(f"  seed {seed} {mode}: {seconds:.1f} s"),
    )
    print()
    print(markdown_table(comparison))
    print(f"Results: {out}/comparison.json, comparison.md, comparison.png")
    return 0
