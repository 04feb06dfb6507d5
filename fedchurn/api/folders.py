"""Run folders: find them, tell what state each is in, and continue one from its folder alone.

A run folder (``output_dir`` of ``fedchurn simulate`` or ``fedchurn run``) holds ``config.yaml`` (the run's config,
with its ``federation.run_name``), ``rounds.jsonl`` (one record per reply, per round), the server's checkpoint
after every completed round (``checkpoints/server-state.json``, written last) and, once the run has ended,
``summary.json``. Only json and yaml are read here: listing runs starts no Flower, Ray or torch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedchurn.shared.config import FedChurnConfig, apply_overrides, load_config, load_yaml
from fedchurn.shared.errors import ConfigError

# The names the server writes (server/report.py, server/resume.py, server/app.py, server/checkpoint.py); kept
# equal to theirs by tests/test_runs.py. Repeated here so that listing runs imports no Flower.
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
ROUNDS_FILE = "rounds.jsonl"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "server-state.json"

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
_NOT_RUNS = frozenset({"institutions", CHECKPOINT_DIR, "data-partitions", "ray-train", "__pycache__"})
_SIM_NAME = "sim-%Y%m%d-%H%M%S"  # the name `fedchurn simulate` gives a run (fedchurn/cli/simulate.py)


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about its run. ``status``: finished, stopped (a checkpointed round, no summary: the
    run was interrupted, or is still under way) or failed (no round completed and no summary)."""

    path: Path
    status: str
    completed_rounds: int
    planned_rounds: int | None
    run_name: str | int | None
    institutions: int
    mean_auc: float | None  # mean over institutions of the latest released test AUC
    epsilon_min: float | None  # each institution's latest reported ε: smallest and largest
    epsilon_max: float | None
    started: dt.datetime | None  # UTC: from the run's generated name, else the folder's oldest file
    deployment: bool  # a `fedchurn run` on real banks (federation.members), not a simulation
    problem: str | None = None  # a file that could not be read

    @property
    def status_text(self) -> str:
        if self.status == FINISHED:
            return FINISHED
        if self.status == STOPPED:
            return f"stopped at round {self.completed_rounds} of {self.planned_rounds or '?'}"
        return f"failed ({self.problem})" if self.problem else "failed before round 1"

    @property
    def resume_command(self) -> str:
        """The command that continues this run (a finished one: with more rounds)."""
        folder = shlex.quote(str(self.path))
        more = f" --rounds N  (N > {self.completed_rounds})" if self.status == FINISHED else ""
        if self.deployment:
            name = shlex.quote(str(self.run_name)) if self.run_name is not None else "NAME"
            return f"fedchurn run {folder}/{CONFIG_FILE} --federation FEDERATION --run-name {name} --resume{more}"
        return f"fedchurn simulate --resume {folder}{more}"


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / SUMMARY_FILE).is_file()
        or (path / ROUNDS_FILE).is_file()
        or (path / CHECKPOINT_DIR / STATE_FILE).is_file()
    )


def find_runs(folder: str | Path, *, depth: int = 3) -> list[Path]:
    """Run folders at or under ``folder`` (at most ``depth`` levels down; not inside a run folder), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError("FOLDER", str(root), "is not a folder", "give a folder that holds run folders")
    return sorted(_walk(root, depth))


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    if is_run_folder(folder):
        yield folder
        return
    if depth <= 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for child in children:
        if child.name not in _NOT_RUNS and not child.name.startswith("."):
            yield from _walk(child, depth - 1)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _last_train_epsilons(rounds_path: Path) -> dict[str, float]:
    """Each institution's ε in its latest accepted training reply (evaluation off: no evaluation records)."""
    latest: dict[str, float] = {}
    if not rounds_path.is_file():
        return latest
    for line in rounds_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("phase") == "train" and "reason" not in record and record.get("epsilon") is not None:
            latest[str(record["institution"])] = float(record["epsilon"])
    return latest


def _started(folder: Path, run_name: Any) -> dt.datetime | None:
    if isinstance(run_name, str) and run_name.startswith("sim-"):
        try:
            return dt.datetime.strptime(run_name[:19], _SIM_NAME).replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    times = [
        p.stat().st_mtime
        for p in (
            folder / CONFIG_FILE,
            folder / CHECKPOINT_DIR / "encoder-round-0001.npz",
            *folder.glob("institutions/*/*.key"),
        )
        if p.is_file()
    ]
    return dt.datetime.fromtimestamp(min(times), tz=dt.UTC) if times else None


def inspect_run(folder: str | Path) -> RunInfo:
    """Read a run folder's summary, checkpoint and config; never raises for a damaged folder (``problem``)."""
    path = Path(folder).expanduser().resolve()
    if not is_run_folder(path):
        raise ConfigError(
            "RUN_DIR",
            str(path),
            f"is not a run folder (no {SUMMARY_FILE}, {ROUNDS_FILE} or {CHECKPOINT_DIR}/{STATE_FILE})",
            "give the output folder of a fedchurn simulate or fedchurn run; 'fedchurn runs FOLDER' lists them",
        )
    problem = None
    summary: Mapping[str, Any] | None = None
    state: Mapping[str, Any] | None = None
    config: Mapping[str, Any] = {}
    try:
        summary = _read_json(path / SUMMARY_FILE)
        state = _read_json(path / CHECKPOINT_DIR / STATE_FILE)
        if (path / CONFIG_FILE).is_file():
            config = load_yaml((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        train_epsilons = _last_train_epsilons(path / ROUNDS_FILE)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        problem = f"unreadable: {type(exc).__name__}: {exc}"
        train_epsilons = {}
    records = state.get("records", {}) if isinstance(state, Mapping) else {}
    planned = config.get("rounds") if isinstance(config, Mapping) else None
    if isinstance(summary, Mapping):
        status = FINISHED
        completed = int(summary.get("rounds", 0))
        planned = summary.get("rounds_planned", planned)
        latest = summary.get("institutions", {})
        run_name = summary.get("run_id")
    elif isinstance(state, Mapping) and isinstance(state.get("round"), int):
        status = STOPPED
        completed = int(state["round"])
        planned = state.get("rounds_planned", planned)
        latest = records.get("latest", {}) if isinstance(records, Mapping) else {}
        run_name = state.get("run_name")
    else:
        status, completed, latest, run_name = FAILED, 0, {}, None
    federation = config.get("federation", {}) if isinstance(config, Mapping) else {}
    if run_name is None and isinstance(federation, Mapping):
        run_name = federation.get("run_name")
    latest = latest if isinstance(latest, Mapping) else {}
    aucs = _finite([m.get("auc") for m in latest.values() if isinstance(m, Mapping)])
    epsilons = _finite([m.get("epsilon") for m in latest.values() if isinstance(m, Mapping)])
    if not epsilons:
        epsilons = _finite(list(train_epsilons.values()))
    names = set(latest) | set(train_epsilons)
    return RunInfo(
        path=path,
        status=status,
        completed_rounds=completed,
        planned_rounds=int(planned) if isinstance(planned, int) else None,
        run_name=run_name,
        institutions=len(names),
        mean_auc=sum(aucs) / len(aucs) if aucs else None,
        epsilon_min=min(epsilons) if epsilons else None,
        epsilon_max=max(epsilons) if epsilons else None,
        started=_started(path, run_name),
        deployment=bool(isinstance(federation, Mapping) and federation.get("members")),
        problem=problem,
    )


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> FedChurnConfig:
    """The config that continues the simulation in ``run_dir``: its own ``config.yaml`` with ``output_dir`` set to
    the folder, its run name, ``federation.resume: true`` and ``overrides`` (only ``rounds``, ``output_dir``,
    ``federation.*`` and ``simulation.*`` may differ from the interrupted run; the server checks that).

    Refuses, naming the fix, a folder that is not a run, a run that cannot be resumed, and a finished run
    without more rounds.
    """
    info = inspect_run(run_dir)
    path = info.path
    if info.problem:
        raise ConfigError("RUN_DIR", str(path), f"cannot be resumed: {info.problem}")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError("RUN_DIR", str(path), f"holds no {CONFIG_FILE}: the run's config is needed to resume it")
    if info.deployment:
        raise ConfigError(
            "RUN_DIR",
            str(path),
            "is a run on a real federation (federation.members), not a simulation",
            f"continue it with: {info.resume_command}",
        )
    if not isinstance(info.run_name, str):
        raise ConfigError(
            "RUN_DIR",
            str(path),
            f"was started without federation.run_name (its institutions keyed their ε by Flower's run id "
            f"{info.run_name!r}), so it cannot be continued",
            "start a new run in another folder",
        )
    config = load_config(path / CONFIG_FILE)
    changes: dict[str, Any] = {"output_dir": str(path), "federation.run_name": info.run_name}
    changes.update(overrides or {})
    changes["federation.resume"] = True
    config = apply_overrides(config, changes)
    if Path(config.output_dir).resolve() != path:
        raise ConfigError("output_dir", config.output_dir, "a resumed run stays in its folder", f"leave it {path}")
    if info.status == FINISHED and config.rounds <= info.completed_rounds:
        raise ConfigError(
            "rounds",
            config.rounds,
            f"the run in {path} already finished its {info.completed_rounds} rounds",
            f"ask for more rounds: fedchurn simulate --resume {shlex.quote(str(path))} --rounds "
            f"{info.completed_rounds + 5} (Python: fedchurn.simulate(resume=..., rounds=...))",
        )
    if info.status == STOPPED and config.rounds < info.completed_rounds:
        raise ConfigError(
            "rounds", config.rounds, f"the run in {path} already completed {info.completed_rounds} rounds"
        )
    return dataclasses.replace(config, output_dir=str(path))
