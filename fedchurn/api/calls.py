"""The Python API: the same library calls the ``fedchurn`` commands make, returning result objects.

Config and overrides, for every call that takes a config:

- ``config``: ``None`` (the embedded default), a YAML path, a mapping shaped like the YAML, or a
  :class:`~fedchurn.shared.config.FedChurnConfig`;
- overrides as keyword arguments, a dotted key spelled with ``__``: ``privacy__target_epsilon=3.0`` is
  ``--set privacy.target_epsilon=3.0``; top-level keys as they are (``rounds=2``, ``seed=5``, ``output_dir=...``).
  The values are Python values (no YAML parsing); relative paths are relative to the current folder, as on the
  command line. Keys that are not identifiers (an institution named ``bank-01`` in ``data.institution_files``):
  change the config itself with ``fedchurn.shared.config.apply_overrides`` and pass it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedchurn.api.folders import ROUNDS_FILE, SUMMARY_FILE, resume_config
from fedchurn.api.results import (
    AuditResult,
    ComparisonResult,
    PredictionResult,
    PretrainResult,
    RunResult,
    read_audit,
    read_comparison,
    read_run,
)
from fedchurn.shared.config import (
    FedChurnConfig,
    apply_overrides,
    config_from_dict,
    default_config,
    load_config,
    resolve_paths,
)
from fedchurn.shared.errors import ConfigError

ConfigInput = FedChurnConfig | str | os.PathLike[str] | Mapping[str, Any] | None


def dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"privacy__delta": 1e-6}`` -> ``{"privacy.delta": 1e-6}``."""
    return {key.replace("__", "."): value for key, value in overrides.items()}


def resolve_config(config: ConfigInput = None, overrides: Mapping[str, Any] | None = None) -> FedChurnConfig:
    """A validated config from any accepted input and ``__``-spelled overrides (see the module's docstring)."""
    if config is None:
        resolved = default_config()
    elif isinstance(config, FedChurnConfig):
        resolved = config
    elif isinstance(config, (str, os.PathLike)):
        resolved = load_config(Path(config))
    elif isinstance(config, Mapping):
        resolved = resolve_paths(config_from_dict(dict(config)), base_dir=Path.cwd())
    else:
        raise ConfigError("config", type(config).__name__, "must be None, a YAML path, a mapping or a FedChurnConfig")
    changes = dotted(overrides or {})
    if changes:
        resolved = resolve_paths(apply_overrides(resolved, changes), base_dir=Path.cwd())
    return resolved


def new_run_name() -> str:
    """A run name as ``fedchurn simulate`` gives one: it makes the run resumable, with every institution's ε."""
    return dt.datetime.now(dt.UTC).strftime("sim-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def simulation_config(
    config: ConfigInput = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> FedChurnConfig:
    """The config a simulation runs with: a new run (named, in a folder without an earlier run unless
    ``overwrite``), or ``resume``: the run in that folder, continued with its own config."""
    if resume is not None:
        if config is not None:
            raise ConfigError(
                "config",
                str(config),
                "resume=RUN_DIR continues that run with its own config.yaml",
                "leave config out; pass changes (rounds=N, simulation__...) as keyword overrides",
            )
        return resume_config(Path(resume), dotted(overrides or {}))
    resolved = resolve_config(config, overrides)
    if resolved.federation.run_name is None:
        resolved = apply_overrides(resolved, {"federation.run_name": new_run_name()})
    out = Path(resolved.output_dir)
    earlier = [m for m in (SUMMARY_FILE, ROUNDS_FILE) if (out / m).exists()]
    if earlier and not overwrite and not resolved.federation.resume:
        raise ConfigError(
            "output_dir",
            str(out),
            "already holds an earlier run",
            "choose another output_dir, pass overwrite=True to replace its results, or resume=that folder",
        )
    return resolved


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[None]:
    """One line per round on stderr (the ``fedchurn.progress`` logger), unless the caller already shows it."""
    progress = logging.getLogger("fedchurn.progress")
    if not show or progress.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = progress.level, progress.propagate
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    try:
        yield
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
        progress.propagate = propagate


def simulate(
    config: ConfigInput = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    ray_address: str | None = None,
    verbose: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> RunResult:
    """Run a simulated federation (``fedchurn simulate``) and return it as a :class:`RunResult`.

    ``resume=RUN_DIR`` continues the run in that folder from its last completed round (``rounds=N`` for more
    rounds than it planned). Interrupted (Ctrl-C once), the run stops after the round under way and the result
    says ``stopped at round k of n``; resume it the same way. ``progress``: one line per round on stderr.
    """
    from fedchurn.server.resume import RunInterrupted
    from fedchurn.simulation.driver import plan_simulation, run_simulation

    prepared = simulation_config(config, resume=resume, overwrite=overwrite, overrides=overrides)
    plan = plan_simulation(prepared)
    if prepared.strategy.min_replies > len(plan.institutions):
        from fedchurn.simulation.driver import discard_plan

        discard_plan(plan)
        raise ConfigError(
            "strategy.min_replies",
            prepared.strategy.min_replies,
            f"exceeds the {len(plan.institutions)} institutions of this simulation: no round could complete",
            f"set it to at most {len(plan.institutions)}",
        )
    with _progress(progress), contextlib.suppress(RunInterrupted):  # checkpointed: the result says where it stopped
        run_simulation(plan, ray_address=ray_address, verbose=verbose)
    return read_run(plan.config.output_dir)


def load_run(run_dir: str | os.PathLike[str]) -> RunResult:
    """An existing run folder as the object ``simulate`` returns (finished, stopped or failed)."""
    return read_run(Path(run_dir))


def compare(
    config: ConfigInput = None,
    *,
    out: str | os.PathLike[str] = "fedchurn-compare",
    modes: Sequence[str] | None = None,
    seeds: int = 3,
    target_epsilon: float | None = None,
    overwrite: bool = False,
    ray_address: str | None = None,
    verbose: bool = False,
    **overrides: Any,
) -> ComparisonResult:
    """``fedchurn compare``: every mode on identical splits at one target ε over ``seeds`` seeds. Without a
    ``target_epsilon`` and with a config that fixes σ, compares at ε = 3 (as the command does)."""
    from fedchurn.comparison.runner import plan_comparison, run_comparison

    plan = plan_comparison(
        resolve_config(config, overrides),
        modes=",".join(modes) if modes else None,
        seeds=seeds,
        target_epsilon=target_epsilon,
        output_dir=Path(out),
        overwrite=overwrite,
    )
    comparison = run_comparison(
        plan.config,
        modes=plan.modes,
        seeds=plan.seeds,
        output_dir=plan.output_dir,
        ray_address=ray_address,
        verbose=verbose,
    )
    return read_comparison(plan.output_dir, comparison)


def pretrain(
    config: ConfigInput = None,
    *,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    ray_address: str | None = None,
    **overrides: Any,
) -> PretrainResult:
    """``fedchurn pretrain``: the shared encoder on source data with Ray Train (not differentially private)."""
    from fedchurn.pretraining.trainer import ENCODER_FILE, pretrain_encoder

    resolved = resolve_config(config, overrides)
    folder = Path(out).expanduser()
    if (folder / ENCODER_FILE).exists() and not overwrite:
        raise ConfigError(
            "out", str(folder), f"already holds an {ENCODER_FILE}", "choose another folder or overwrite=True"
        )
    result = pretrain_encoder(resolved, out_dir=folder, ray_address=ray_address)
    metrics = {k: float(v) for k, v in result.metadata.get("metrics", {}).items()}
    return PretrainResult(
        out_dir=result.checkpoint.parent, checkpoint=result.checkpoint, metadata=result.metadata, metrics=metrics
    )


def predict(
    run_dir: str | os.PathLike[str],
    institution: str,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    id_column: str | None = None,
    overwrite: bool = False,
) -> PredictionResult:
    """``fedchurn predict``: score customers with ``institution``'s kept model from ``run_dir``. The scores are
    written to ``output_path`` (default: beside the input, ``<name>.scores.csv``) and returned as a frame."""
    import pandas as pd

    from fedchurn.scoring import score_customers

    source = Path(input_path)
    target = Path(output_path) if output_path is not None else source.with_name(source.stem + ".scores.csv")
    result = score_customers(Path(run_dir), institution, source, target, id_column=id_column, overwrite=overwrite)
    id_types = {result.id_column: str} if result.id_column else None
    return PredictionResult(
        output=result.output,
        scores=pd.read_csv(result.output, dtype=id_types, keep_default_na=False),
        model_round=result.model_round,
        calibrated=result.calibrated,
        metrics=result.metrics,
        calibration=pd.DataFrame(result.calibration),
    )


def audit(run_dir: str | os.PathLike[str], *, consortium_fingerprint: str | None = None) -> AuditResult:
    """``fedchurn audit`` (without --empirical): every bank's ledger checked and its ε recomposed."""
    from fedchurn.auditing.run_audit import audit_run

    return read_audit(audit_run(Path(run_dir), consortium_fingerprint=consortium_fingerprint).to_dict())


__all__ = [
    "audit",
    "compare",
    "load_run",
    "predict",
    "pretrain",
    "resolve_config",
    "simulate",
]
