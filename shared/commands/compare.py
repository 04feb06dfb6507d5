"""`fedchurn compare`: the transfer modes side by side, on the same inputs as `simulate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from shared.commands.simulate import add_run_inputs, resolve_run_config
from shared.config import apply_overrides
from shared.errors import ConfigError

DEFAULT_OUT = "fedchurn-compare"


def register(commands: Any) -> None:
    from shared.transfer import ALL_MODES

    parser = commands.add_parser(
        "compare",
        help="run the transfer modes on identical splits and seeds and compare AUC and ε",
        description="Run every listed transfer mode on the same data, splits and seeds; write DIR/comparison.json, "
        "comparison.md and comparison.png. 'centralized' pools rows without DP: a research upper bound only.",
    )
    add_run_inputs(parser)
    parser.add_argument(
        "--modes", default=",".join(ALL_MODES), help=f"comma-separated modes (default: {','.join(ALL_MODES)})"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shared.comparison import COMPARISON_JSON, markdown_table, parse_modes, run_comparison

    modes = parse_modes(args.modes)
    config = resolve_run_config(args)
    out = Path(args.out or DEFAULT_OUT)
    config = apply_overrides(config, {"output_dir": str(out.resolve())})
    if (out / COMPARISON_JSON).exists() and not args.overwrite:
        raise ConfigError("--out", str(out), "already holds a comparison", "choose another folder or --overwrite")
    checkpoint = config.model.encoder_checkpoint or "none (random initial encoder)"
    print(f"Comparing {', '.join(modes)} on the same splits (seed {config.seed}); encoder checkpoint: {checkpoint}")
    comparison = run_comparison(
        config,
        modes=modes,
        output_dir=out,
        ray_address=args.ray_address,
        verbose=args.verbose,
        on_mode=lambda mode, seconds: print(f"  {mode}: {seconds:.1f} s"),
    )
    print()
    print(markdown_table(comparison))
    print(f"Results: {out}/comparison.json, comparison.md, comparison.png")
    return 0
