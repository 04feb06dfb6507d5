"""Checkpoint the whole server side after every round, and resume an interrupted run (numpy + json; no torch).

After round k the server's folder holds, besides ``checkpoints/encoder-round-k.npz`` (``server/checkpoint.py``):

- ``checkpoints/strategy-round-k.npz``: the strategy's own state (FedAdam's moments ``m_t``/``v_t``; empty for
  FedAvg/FedProx);
- ``checkpoints/server-state.json`` (written last, atomically, so it always names a complete round): the run's
  identity (``federation.run_name``), the round, a fingerprint of the config, and the consortium-side records
  (latest metrics per institution, dropped replies, round times).

A run started with ``federation.resume: true`` and the same ``run_name`` continues at round k+1 with the same
encoder, strategy state and records; ``rounds.jsonl`` keeps rounds 1..k and is appended from there. The
institutions key their head and privacy accountant by the same ``run_name`` (``clients/state.py``), so their
ε continues too. A round that was under way when the server died is trained again; the institutions' accountants
already counted it, so ε is never under-reported (it may be over-reported by that one round).

Also here: the round offset a resumed strategy needs (Flower's ``Strategy.start`` counts rounds from 1), and the
record of replies that never came (a node that died, or a straggler past ``strategy.round_timeout_s``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedchurn.server.checkpoint import CHECKPOINT_DIR, load_round, round_checkpoint_path
from fedchurn.server.strategy import DroppedReply, reply_institution
from fedchurn.shared.config import FedChurnConfig, config_to_dict
from fedchurn.shared.errors import ConfigError, FedChurnError

logger = logging.getLogger(__name__)

STATE_FILE = "server-state.json"
STATE_FORMAT = 1
# Strategy attributes that carry state from round to round (Flower's FedOpt family: FedAdam, FedYogi, FedAdagrad).
STRATEGY_STATE_ATTRIBUTES = ("m_t", "v_t")
# Config sections that may differ between an interrupted run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("rounds", "output_dir", "federation", "simulation")
ROUNDS_FILE = "rounds.jsonl"
SILENT_ROUNDS = 2  # rounds in a row without a single answer before the run stops with an error


# Files only a run writes: a folder holding one of them holds an earlier run.
RUN_MARKERS = ("summary.json", ROUNDS_FILE, "consortium_ledger.jsonl", CHECKPOINT_DIR)


class ResumeError(FedChurnError):
    """An interrupted run cannot be continued consistently."""


class NoRepliesError(FedChurnError):
    """Round after round, no institution answered."""


class RunInterrupted(FedChurnError):
    """The run was asked to stop (Ctrl-C); it stopped after a completed, checkpointed round."""

    def __init__(self, completed_round: int) -> None:
        super().__init__(f"stopped on request after round {completed_round}, which is checkpointed")
        self.completed_round = completed_round


def check_new_run_folder(output_dir: Path) -> None:
    """A new run never writes into the folder of an earlier one (its results and hash-chained ledger)."""
    earlier = [marker for marker in RUN_MARKERS if (output_dir / marker).exists()]
    if earlier:
        raise ConfigError(
            "output_dir",
            str(output_dir),
            f"already holds an earlier run ({', '.join(earlier)})",
            "choose another folder (--out), or continue that run with --run-name NAME --resume",
        )


def strategy_state_path(output_dir: Path, server_round: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"strategy-round-{server_round:04d}.npz"


def state_path(output_dir: Path) -> Path:
    return output_dir / CHECKPOINT_DIR / STATE_FILE


def config_fingerprint(config: FedChurnConfig) -> str:
    """sha256 of every config value that shapes the training (not rounds, folders, identity or Ray resources)."""
    values = {k: v for k, v in config_to_dict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode("utf-8")).hexdigest()


# --- strategy state -------------------------------------------------------------------------------


def _strategy_chain(strategy: Any) -> list[Any]:
    """The strategy and any strategies it wraps (Flower's DP wrappers keep theirs in ``.strategy``)."""
    chain = [strategy]
    while hasattr(chain[-1], "strategy") and chain[-1].strategy is not None and len(chain) < 8:
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """The round-to-round state of the strategy as flat arrays: ``"<depth>/<attribute>/<key>"``."""
    flat: dict[str, np.ndarray] = {}
    for depth, item in enumerate(_strategy_chain(strategy)):
        for attribute in STRATEGY_STATE_ATTRIBUTES:
            value = getattr(item, attribute, None)
            if isinstance(value, Mapping):
                for key, array in value.items():
                    flat[f"{depth}/{attribute}/{key}"] = np.asarray(array)
    return flat


def restore_strategy_state(strategy: Any, flat: Mapping[str, np.ndarray]) -> None:
    chain = _strategy_chain(strategy)
    restored: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in flat.items():
        depth_text, attribute, key = name.split("/", 2)
        depth = int(depth_text)
        if depth >= len(chain) or attribute not in STRATEGY_STATE_ATTRIBUTES:
            raise ResumeError(f"the checkpointed strategy state holds {name!r}, which this strategy does not have")
        restored.setdefault((depth, attribute), {})[key] = array
    for (depth, attribute), arrays in restored.items():
        setattr(chain[depth], attribute, arrays)


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{key: np.asarray(value) for key, value in arrays.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the resume point -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Everything the server had after its last completed round."""

    completed_round: int
    arrays: dict[str, np.ndarray]  # what travelled after that round (the global encoder, and the head in fedavg)
    strategy: dict[str, np.ndarray]
    records: dict[str, Any]  # RunRecorder.export_state()
    round_lines: list[str]  # rounds.jsonl lines of rounds 1..completed_round


def load_resume_point(config: FedChurnConfig, output_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from when ``federation.resume`` is set; None to start at round 1."""
    if not config.federation.resume:
        return None
    path = state_path(output_dir)
    if not path.is_file():
        logger.warning("federation.resume: no checkpoint in %s yet; starting at round 1", output_dir)
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path} is unreadable ({exc}); cannot resume") from None
    _check_state(path, state)
    if state["run_name"] != config.federation.run_name:
        raise ConfigError(
            "federation.run_name",
            config.federation.run_name,
            f"the checkpoint in {output_dir} belongs to run {state['run_name']!r}",
            "give that run name to resume it, or another output_dir for a new run",
        )
    if state["fingerprint"] != config_fingerprint(config):
        raise ConfigError(
            "federation.resume",
            True,
            f"the config differs from the one run {state['run_name']!r} was started with "
            f"(only {', '.join(RESUMABLE_CHANGES)} may change)",
            f"compare with {output_dir / 'config.yaml'}",
        )
    completed = int(state["round"])
    if config.rounds < completed:
        raise ConfigError("rounds", config.rounds, f"run {state['run_name']!r} already completed {completed} rounds")
    encoder_path = round_checkpoint_path(output_dir, completed)
    strategy_path = strategy_state_path(output_dir, completed)
    for needed in (encoder_path, strategy_path):
        if not needed.is_file():
            raise ResumeError(f"{needed} is missing: the checkpoint of round {completed} is incomplete")
    strategy = _load_finite_arrays(strategy_path)
    arrays = _load_finite_arrays(encoder_path)
    rounds_path = output_dir / ROUNDS_FILE
    lines: list[str] = []
    if rounds_path.is_file():
        for number, line in enumerate(rounds_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                server_round = int(json.loads(line).get("round", 0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise ResumeError(f"{rounds_path}, line {number}: not a round record; cannot resume") from None
            if server_round <= completed:
                lines.append(line)
    logger.warning("resuming run %r after round %d of %d", state["run_name"], completed, config.rounds)
    return ResumePoint(
        completed_round=completed,
        arrays=arrays,
        strategy=strategy,
        records=state["records"],
        round_lines=lines,
    )


def _check_state(path: Path, state: Any) -> None:
    """The server-state file has the fields, of the types, that resuming reads; else ResumeError naming it."""
    problem = None
    if not isinstance(state, dict):
        problem = "not a JSON object"
    elif state.get("format") != STATE_FORMAT:
        problem = f"format {state.get('format')!r}; this version reads format {STATE_FORMAT}"
    elif not isinstance(state.get("round"), int) or isinstance(state.get("round"), bool) or state["round"] < 1:
        problem = f"'round' must be a round number >= 1, got {state.get('round')!r}"
    elif not isinstance(state.get("run_name"), (str, int)) or not isinstance(state.get("fingerprint"), str):
        problem = "'run_name' or 'fingerprint' is missing"
    else:
        records = state.get("records")
        needed = {"latest": dict, "trained": dict, "dropped": list, "completed_rounds": int, "round_seconds": list}
        if not isinstance(records, dict) or any(not isinstance(records.get(k), t) for k, t in needed.items()):
            problem = f"'records' must hold {', '.join(needed)}"
        elif not all(isinstance(v, dict) for v in records["latest"].values()):
            problem = "'records.latest' must map each institution to its metrics"
    if problem:
        raise ResumeError(f"{path} is not a valid server checkpoint ({problem}); cannot resume")


def _load_finite_arrays(path: Path) -> dict[str, np.ndarray]:
    """A checkpointed ``.npz`` of finite floating-point arrays; ResumeError naming the file otherwise."""
    try:
        arrays = load_round(path)
    except Exception as exc:  # a corrupt or truncated archive: numpy raises several kinds
        raise ResumeError(f"{path} is unreadable ({type(exc).__name__}: {exc}); cannot resume") from None
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ResumeError(f"{path}: array {key!r} is not finite floating point; cannot resume from it")
    return arrays


def check_resumed_arrays(path: Path, arrays: Mapping[str, np.ndarray], fresh: Mapping[str, Any]) -> None:
    """The checkpointed arrays have exactly the keys and shapes this config's model has."""
    missing, unexpected = sorted(set(fresh) - set(arrays)), sorted(set(arrays) - set(fresh))
    if missing or unexpected:
        raise ResumeError(f"{path} does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in fresh.items():
        if tuple(arrays[key].shape) != tuple(np.shape(value)):
            raise ResumeError(
                f"{path}: {key!r} has shape {tuple(arrays[key].shape)}, this model's is {tuple(np.shape(value))}"
            )


# --- the round offset and missing replies -----------------------------------------------------------


class ResumableRounds(Strategy):
    """A strategy wrapper: shifts Flower's round numbers by ``round_offset`` (a resumed run's first round is
    k+1, for the clients' seeds, FedAdam's bias correction and every record), and records the replies that never
    came back (a node that died, or a straggler past the round timeout) as dropped."""

    def __init__(
        self, strategy: Strategy, *, round_offset: int, round_timeout_s: float | None, observer: Any = None
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.round_offset = round_offset
        self.round_timeout_s = round_timeout_s
        self.missing_observer = observer  # the run recorder: records what never came back
        self._sent: list[Message] = []
        self._node_names: dict[int, str] = {}
        self._silent_rounds = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._remember_sent(
            self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self._screen_unreachable(server_round + self.round_offset, "train", list(replies))
        result = self.strategy.aggregate_train(server_round + self.round_offset, kept)
        self._check_silence(server_round + self.round_offset, kept)
        return result

    def _check_silence(self, server_round: int, kept: list[Message]) -> None:
        """Stop, with a clear error, after ``SILENT_ROUNDS`` rounds in a row where no institution answered at all
        (no reply, or only error replies): every node is gone, e.g. the Ray cluster of a simulation died."""
        self._silent_rounds = 0 if any(not reply.has_error() for reply in kept) else self._silent_rounds + 1
        if self._silent_rounds >= SILENT_ROUNDS:
            raise NoRepliesError(
                f"rounds {server_round - SILENT_ROUNDS + 1}-{server_round}: no institution answered (no reply, or "
                "only errors). Are the SuperNodes, or the Ray cluster of a simulation, still up? The run can be "
                "resumed from its last completed round"
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._remember_sent(
            self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept = self._screen_unreachable(server_round + self.round_offset, "evaluate", list(replies))
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, kept)

    def summary(self) -> None:
        self.strategy.summary()

    def _remember_sent(self, messages: Iterable[Message]) -> list[Message]:
        self._sent = list(messages)
        return self._sent

    def _who(self, node: int) -> str:
        name = self._node_names.get(node)
        return f"{name} (node {node})" if name else f"node {node}"

    def _screen_unreachable(self, server_round: int, phase: str, replies: list[Message]) -> list[Message]:
        """Record, under the institution's name, every sent message that got no reply or only the SuperLink's
        error reply for an unreachable node; pass every other reply on to the strategy."""
        destination = {}
        for sent in self._sent:
            for key in (sent.metadata.message_id, sent.object_id):
                if key:
                    destination[key] = sent.metadata.dst_node_id
        sent_to = {sent.metadata.dst_node_id for sent in self._sent}
        kept: list[Message] = []
        answered: set[int] = set()
        dropped: list[DroppedReply] = []
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error() and reply.metadata.src_node_id not in sent_to:  # written by the SuperLink
                reason = f"node unreachable: {reply.error.reason}"
                dropped.append(DroppedReply(institution=self._who(node), reason=reason))
                continue
            name = reply_institution(reply) if not reply.has_error() else None
            if name:
                self._node_names[reply.metadata.src_node_id] = name
            kept.append(reply)
        limit = f" within strategy.round_timeout_s = {self.round_timeout_s:g} s" if self.round_timeout_s else ""
        for node in sorted(sent_to - answered):
            dropped.append(DroppedReply(institution=self._who(node), reason=f"no reply{limit} (node down or too slow)"))
        if dropped and self.missing_observer is not None:
            for item in dropped:
                logger.warning("round %d %s: %s: %s", server_round, phase, item.institution, item.reason)
            if phase == "train":
                self.missing_observer.on_train(server_round, [], dropped)
            else:
                self.missing_observer.on_evaluate(server_round, [], dropped)
        return kept


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class ResumableRun:
    """Ties a run's recorder and strategy to its checkpoints. Build it before the RunRecorder (which truncates
    ``rounds.jsonl``), then run the strategy ``attach`` returns, with ``round_finished`` as ``evaluate_fn``."""

    config: FedChurnConfig
    output_dir: Path
    identity: int | str
    point: ResumePoint | None
    recorder: Any = None
    strategy: Any = None
    on_round: list[Callable[[int], None]] = field(default_factory=list)  # hooks (tests, progress)
    stop: threading.Event | None = None  # set (Ctrl-C): stop after the round under way is checkpointed

    @classmethod
    def prepare(cls, config: FedChurnConfig, output_dir: Path, *, flower_run_id: int) -> ResumableRun:
        return cls(
            config=config,
            output_dir=output_dir,
            identity=config.federation.identity(flower_run_id),
            point=load_resume_point(config, output_dir),
        )

    @property
    def completed_before(self) -> int:
        return self.point.completed_round if self.point is not None else 0

    @property
    def remaining_rounds(self) -> int:
        return self.config.rounds - self.completed_before

    def arrays_or(self, fresh: Mapping[str, Any]) -> dict[str, Any]:
        """The arrays to start from: the checkpointed ones when resuming (checked against ``fresh``), else
        ``fresh``."""
        if self.point is None:
            return dict(fresh)
        path = round_checkpoint_path(self.output_dir, self.point.completed_round)
        check_resumed_arrays(path, self.point.arrays, fresh)
        return dict(self.point.arrays)

    def attach(self, recorder: Any, strategy: Any) -> Any:
        self.recorder = recorder
        self.strategy = ResumableRounds(
            strategy,
            round_offset=self.completed_before,
            round_timeout_s=self.config.strategy.round_timeout_s,
            observer=recorder,
        )
        if self.point is not None:
            try:
                recorder.restore_state(self.point.records, self.point.round_lines)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ResumeError(
                    f"{state_path(self.output_dir)}: its records cannot be restored ({exc!r}); cannot resume"
                ) from None
            path = strategy_state_path(self.output_dir, self.point.completed_round)
            for name, array in self.point.strategy.items():
                key = name.split("/", 2)[-1]
                reference = self.point.arrays.get(key)
                if reference is None or array.shape != reference.shape:
                    raise ResumeError(f"{path}: {name!r} does not match the checkpointed encoder; cannot resume")
            restore_strategy_state(self.strategy, self.point.strategy)
        return self.strategy

    def round_finished(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the recorder's end of round, then the server-side checkpoint."""
        absolute = server_round + self.completed_before if server_round > 0 else 0
        result = self.recorder.round_finished(absolute, arrays)  # also writes encoder-round-k.npz
        if absolute > 0:
            self.checkpoint(absolute)
            for hook in self.on_round:
                hook(absolute)
            if self.stop is not None and self.stop.is_set() and absolute < self.config.rounds:
                raise RunInterrupted(absolute)
        return result  # type: ignore[no-any-return]

    def checkpoint(self, server_round: int) -> None:
        _save_npz(strategy_state_path(self.output_dir, server_round), strategy_state(self.strategy))
        _write_json(
            state_path(self.output_dir),
            {
                "format": STATE_FORMAT,
                "run_name": self.identity,
                "round": server_round,
                "rounds_planned": self.config.rounds,
                "fingerprint": config_fingerprint(self.config),
                "records": self.recorder.export_state(),
            },
        )
