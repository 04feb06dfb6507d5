"""`fedchurn compare`: every transfer mode and the baselines a bank would weigh, at one target ε, over seeds.

Fair by construction:

- every private mode is given the same ``privacy.target_epsilon`` per institution, and each derives its own σ
  over its own steps (fedrep's two DP phases together spend what the one-phase modes spend);
- each seed changes the splits, the initial weights, the sampling and the noise; every mode sees the same seed's
  splits, so differences within a seed are the modes'. Results are the mean over seeds with a 95 % confidence
  interval (Student t);
- ``frozen`` trains heads on a fixed encoder: it is only meaningful with a pretrained one, and is refused
  without ``model.encoder_checkpoint``;
- next to the private modes: each bank's own non-private logistic regression and gradient-boosted trees, its own
  DP model alone (``local``), and the pooled non-private network (``centralized``), each labelled as such.

The federated modes all run on one local Ray head started once (or on ``--ray-address``). Writes
``comparison.json``, ``comparison.md`` and ``comparison.png``, and each federated run under ``DIR/seed-S/MODE/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedchurn.shared.config import FedChurnConfig, dump_config
from fedchurn.shared.errors import ConfigError, FedChurnError
from fedchurn.shared.institution_rows import institution_names
from fedchurn.shared.transfer import FEDERATED_MODES

logger = logging.getLogger(__name__)

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
KEPT_METRICS = ("auc", "pr_auc", "epsilon")

NON_PRIVATE_BASELINES: tuple[str, ...] = ("logreg", "hgb")  # each bank on its own rows, scikit-learn
COMPARE_MODES: tuple[str, ...] = (*FEDERATED_MODES, "local", "centralized", *NON_PRIVATE_BASELINES)
PRIVATE_MODES: tuple[str, ...] = (*FEDERATED_MODES, "local")

MODE_LABELS = {
    "finetune": "finetune",
    "frozen": "frozen (pretrained encoder)",
    "fedrep": "fedrep",
    "fedavg": "fedavg (head shared)",
    "local": "local (own DP model alone)",
    "centralized": "pooled network (not private, pooled)",
    "logreg": "own logistic regression (not private)",
    "hgb": "own gradient-boosted trees (not private)",
}


def parse_modes(text: str, *, encoder_checkpoint: str | None) -> tuple[str, ...]:
    """``"fedrep,local"`` -> modes, refusing unknown or repeated ones and ``frozen`` without an encoder."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in COMPARE_MODES]
    if not modes or unknown:
        raise ConfigError("--modes", text, f"must list modes among {', '.join(COMPARE_MODES)}")
    if len(set(modes)) != len(modes):
        raise ConfigError("--modes", text, "lists a mode twice")
    if "frozen" in modes and not encoder_checkpoint:
        raise ConfigError(
            "--modes",
            text,
            "'frozen' trains only the heads on a fixed encoder, so it needs a pretrained encoder "
            "(with a random one it measures nothing)",
            "run 'fedchurn pretrain --out enc/' and add --set model.encoder_checkpoint=enc/encoder.pt, "
            "or leave frozen out of --modes",
        )
    return modes


def default_modes(*, encoder_checkpoint: str | None) -> tuple[str, ...]:
    """Every mode; ``frozen`` only when there is a pretrained encoder."""
    return tuple(m for m in COMPARE_MODES if m != "frozen" or encoder_checkpoint)


def at_target_epsilon(config: FedChurnConfig, target_epsilon: float | None) -> FedChurnConfig:
    """The config every mode runs with: σ derived per mode from one target ε (the given one, else the config's)."""
    privacy = config.privacy
    if not privacy.enabled:
        raise ConfigError(
            "privacy.enabled",
            False,
            "compare measures the private modes at one target ε",
            "set privacy.enabled=true (the non-private baselines are part of the comparison anyway)",
        )
    target = target_epsilon if target_epsilon is not None else privacy.target_epsilon
    if target is None:
        raise ConfigError(
            "privacy.target_epsilon",
            None,
            f"compare needs one target ε for every mode; a fixed σ ({privacy.noise_multiplier}) gives each mode a "
            "different ε (fedrep trains two phases)",
            "pass --target-epsilon 3, or set privacy.target_epsilon and privacy.noise_multiplier=null",
        )
    new_privacy = dataclasses.replace(privacy, target_epsilon=float(target), noise_multiplier=None)  # re-checked
    return dataclasses.replace(config, privacy=new_privacy)


def seeds_from(base_seed: int, count: int) -> tuple[int, ...]:
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 100:
        raise ConfigError("--seeds", count, "must be a whole number of seeds in 1..100")
    return tuple(base_seed + i for i in range(count))


DEFAULT_TARGET_EPSILON = 3.0  # when the config fixes σ instead of a target: every mode compared at this one ε


@dataclasses.dataclass(frozen=True)
class ComparisonPlan:
    """What one comparison runs: the config at one target ε writing to ``output_dir``, its modes and seeds."""

    config: FedChurnConfig
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    output_dir: Path
    target_defaulted: bool  # the config fixed σ and no target was given: DEFAULT_TARGET_EPSILON is used


def plan_comparison(
    config: FedChurnConfig,
    *,
    modes: str | None,
    seeds: int,
    target_epsilon: float | None,
    output_dir: Path,
    overwrite: bool,
    out_key: str = "out",
    overwrite_hint: str = "overwrite=True",
) -> ComparisonPlan:
    """Check everything a comparison needs before anything runs (``fedchurn compare`` and ``fedchurn.compare``)."""
    checkpoint = config.model.encoder_checkpoint
    chosen = (
        parse_modes(modes, encoder_checkpoint=checkpoint) if modes else default_modes(encoder_checkpoint=checkpoint)
    )
    defaulted = target_epsilon is None and config.privacy.target_epsilon is None
    config = at_target_epsilon(config, DEFAULT_TARGET_EPSILON if defaulted else target_epsilon)
    folder = output_dir.expanduser().resolve()
    if (folder / COMPARISON_JSON).exists() and not overwrite:
        raise ConfigError(
            out_key, str(folder), "already holds a comparison", f"choose another folder or {overwrite_hint}"
        )
    config = dataclasses.replace(config, output_dir=str(folder))
    return ComparisonPlan(config, chosen, seeds_from(config.seed, seeds), folder, defaulted)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@contextmanager
def _one_ray(config: FedChurnConfig, modes: Sequence[str], ray_address: str | None, out: Path) -> Iterator[str | None]:
    """The address every federated run attaches to: the given one, or one local head for all modes and seeds."""
    address = ray_address or config.simulation.ray_address
    if address or not any(m in FEDERATED_MODES for m in modes):
        yield address
        return
    import os

    from fedchurn.simulation.ray_head import RayHead

    with RayHead(num_cpus=config.simulation.ray_num_cpus or os.cpu_count() or 1, log_path=out / "ray-head.log") as head:
        yield head.address


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_mode(
    config: FedChurnConfig, mode: str, names: Sequence[str], *, out: Path, ray_address: str | None, verbose: bool
) -> dict[str, dict[str, Any]]:
    from fedchurn.comparison.baselines import run_centralized, run_local, run_sklearn

    if mode in ("local", "centralized"):
        with _torch_threads(max(1, int(config.simulation.client_num_cpus))):
            # As many threads as a simulated institution gets: more only contend on these tiny layers.
            return run_local(config, names) if mode == "local" else run_centralized(config, names)
    if mode in NON_PRIVATE_BASELINES:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(max(1, int(config.simulation.client_num_cpus))):  # OpenMP in the trees: the same
            return run_sklearn(config, names, kind=mode)
    from fedchurn.simulation.driver import plan_simulation, run_simulation

    # A research comparison, every party played by one researcher: the banks split by the seed (the same rows as the
    # baselines above, seed by seed), release no DP evaluation (every mode's ε is its training alone, like local's),
    # and each bank's final model is scored here on its exact test rows, as the baselines are.
    mode_config = dataclasses.replace(
        config,
        transfer=dataclasses.replace(config.transfer, mode=mode),  # type: ignore[arg-type]
        privacy=dataclasses.replace(config.privacy, reproducible_noise=True),
        evaluation=dataclasses.replace(config.evaluation, mode="off"),
        output_dir=str(out / f"seed-{config.seed}" / mode),
    )
    run_simulation(plan_simulation(mode_config), ray_address=ray_address, verbose=verbose)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            results[name] = _exact_metrics(mode_config, name)
        except FedChurnError as exc:  # it never trained (declined, or failed): no model to score
            logger.warning("%s: %s has no model to score: %s", mode, name, exc)
    return results


def _exact_metrics(config: FedChurnConfig, name: str) -> dict[str, Any]:
    """A bank's final model (the run's encoder, its head) on its test rows, as the baselines', and its ε."""
    from fedchurn.clients.evaluation import predict_logits
    from fedchurn.clients.metrics import pr_auc, roc_auc
    from fedchurn.clients.prepared_institution import prepare_institution
    from fedchurn.scoring import final_model

    data = prepare_institution(config, name)
    run = Path(config.output_dir)
    home = run / "institutions" / name
    model = final_model(run, home, config, data.feature_names)
    scores = predict_logits(model, data.x_test).numpy()
    privacy_path = home / "privacy.json"
    privacy = json.loads(privacy_path.read_text(encoding="utf-8")) if privacy_path.is_file() else {}
    return {
        "auc": roc_auc(data.y_test, scores),
        "pr_auc": pr_auc(data.y_test, scores),
        "epsilon": privacy.get("epsilon"),  # this run's training only: evaluation is off here
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
    }


def run_comparison(
    config: FedChurnConfig,
    *,
    modes: Sequence[str],
    output_dir: str | Path,
    seeds: Sequence[int] | None = None,
    target_epsilon: float | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
    on_run: Callable[[str, int, float], None] | None = None,
) -> dict[str, Any]:
    """Run every mode for every seed; write and return the comparison (see ``summarise``)."""
    from fedchurn.comparison.report import markdown_table, plot_comparison, summarise

    parse_modes(",".join(modes), encoder_checkpoint=config.model.encoder_checkpoint)
    config = at_target_epsilon(config, target_epsilon)
    seeds = tuple(seeds) if seeds is not None else (config.seed,)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = institution_names(config.data, seed=config.seed)
    runs: dict[str, dict[str, list[dict[str, float | None]]]] = {name: {m: [] for m in modes} for name in names}
    sizes: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {m: 0.0 for m in modes}
    with _one_ray(config, modes, ray_address, out) as address:
        for seed in seeds:
            seed_config = dataclasses.replace(config, seed=seed)
            for mode in modes:
                started = time.perf_counter()
                results = _run_mode(seed_config, mode, names, out=out, ray_address=address, verbose=verbose)
                took = time.perf_counter() - started
                seconds[mode] = round(seconds[mode] + took, 2)
                for name in names:
                    if name in results:
                        runs[name][mode].append({key: _number(results[name].get(key)) for key in KEPT_METRICS})
                        for key in ("n_train", "n_test"):
                            if results[name].get(key) is not None:
                                sizes.setdefault(name, {}).setdefault(key, int(results[name][key]))
                if on_run is not None:
                    on_run(mode, seed, took)
    comparison = summarise(
        runs,
        modes=modes,
        labels={m: MODE_LABELS[m] for m in modes},
        private={m: m in PRIVATE_MODES for m in modes},
        target_epsilon=config.privacy.target_epsilon,
        delta=config.privacy.delta,
        seeds=seeds,
    )
    comparison.update(
        {
            "sizes": sizes,
            "seconds": seconds,
            "rounds": config.rounds,
            "encoder_checkpoint": config.model.encoder_checkpoint,
        }
    )
    (out / COMPARISON_JSON).write_text(json.dumps(comparison, indent=2), encoding="utf-8")
    (out / COMPARISON_MD).write_text(markdown_table(comparison), encoding="utf-8")
    (out / "config.yaml").write_text(dump_config(config, relative_to=out), encoding="utf-8")
    plot_comparison(comparison, out / COMPARISON_PNG)
    from fedchurn.reporting import write_report_safely

    write_report_safely(out)  # report.html of the comparison; a failure is logged, never the comparison's
    return comparison
