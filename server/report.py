"""What the server records about a run: per-round metrics per institution, dropped replies, the summary."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedchurn.server.checkpoint import save_round
from fedchurn.server.strategy import DroppedReply, Reply
from fedchurn.server.tracking import Tracker
from fedchurn.shared.wire import from_array_record

logger = logging.getLogger(__name__)
progress = logging.getLogger("fedchurn.progress")  # one line per round; the CLI shows it

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"

# Reply metric name -> summary field name.
SUMMARY_FIELDS = {
    "auc": "auc",
    "pr-auc": "pr_auc",
    "brier": "brier",
    "ece": "ece",
    "mean-probability": "mean_probability",
    "churn-rate": "churn_rate",
    "epsilon": "epsilon",
    "delta": "delta",
    "n-train": "n_train",
    "n-test": "n_test",
    "val-auc": "val_auc",
    "kept-round": "model_round",  # the round of the model the bank keeps (best DP validation AUC)
    "kept-auc": "model_auc",
    "kept-ece": "model_ece",
}


def _json_number(value: float) -> float | None:
    """JSON has no infinity: ε without DP is reported as null."""
    return value if math.isfinite(value) else None


def _finite_only(value: Any) -> Any:
    """Nested dicts and lists with every non-finite float replaced by None."""
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value


class RunRecorder:
    """Observes the strategy; writes ``rounds.jsonl`` as rounds finish and ``summary.json`` at the end."""

    def __init__(
        self, output_dir: Path, *, rounds: int, tracker: Tracker | None = None, announce_sigma: bool = False
    ) -> None:
        self.output_dir = output_dir
        self.rounds = rounds
        self.tracker = tracker  # tracking.backend (server/tracking.py): each finished round, then the summary
        self._round_replies: dict[str, dict[str, dict[str, float]]] = {"train": {}, "evaluate": {}}
        self.announce_sigma = announce_sigma  # log each bank's σ once known (σ planned from a target ε)
        self._sigma_shown: dict[str, float] = {}
        self.latest: dict[str, dict[str, Any]] = {}  # institution -> its latest evaluation
        self.trained: dict[str, dict[str, float]] = {}  # institution -> its latest training report
        self.dropped: list[dict[str, Any]] = []
        self.completed_rounds = 0
        self._round_started = time.perf_counter()
        self._round_seconds: list[float] = []
        output_dir.mkdir(parents=True, exist_ok=True)
        self._rounds_path = output_dir / ROUNDS_FILE
        self._rounds_path.write_text("", encoding="utf-8")

    # --- RoundObserver ---------------------------------------------------------------------------

    def on_train(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None:
        for reply in accepted:
            self.trained[reply.institution] = reply.metrics
            self._round_replies["train"][reply.institution] = dict(reply.metrics)
            self._write({"round": server_round, "phase": "train", "institution": reply.institution, **reply.metrics})
        self._record_dropped(server_round, "train", dropped)

    def on_evaluate(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None:
        for reply in accepted:
            entry = {SUMMARY_FIELDS[k]: v for k, v in reply.metrics.items() if k in SUMMARY_FIELDS}
            entry["round"] = server_round
            self.latest[reply.institution] = entry
            self._round_replies["evaluate"][reply.institution] = dict(reply.metrics)
            self._write({"round": server_round, "phase": "evaluate", "institution": reply.institution, **reply.metrics})
        self._record_dropped(server_round, "evaluate", dropped)

    # --- end of round (Flower calls the strategy's evaluate_fn after every round) ------------------

    def round_finished(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        replies, self._round_replies = self._round_replies, {"train": {}, "evaluate": {}}
        if server_round == 0:  # called once before the first round
            self._round_started = time.perf_counter()
            return None
        save_round(self.output_dir, server_round, from_array_record(arrays))
        seconds = time.perf_counter() - self._round_started
        self._round_seconds.append(seconds)
        self._round_started = time.perf_counter()
        self.completed_rounds = server_round
        this_round = [v for v in self.latest.values() if v["round"] == server_round]
        aucs = [v["auc"] for v in this_round if math.isfinite(v["auc"])]
        # Rounds where the banks released no evaluation: ε from what they reported training.
        epsilons = [v["epsilon"] for v in this_round] or [v["epsilon"] for v in self.trained.values()]
        dropped_now = sum(1 for d in self.dropped if d["round"] == server_round)
        if self.announce_sigma:
            self._log_new_sigmas()
        progress.info(
            "round %d/%d  %s  ε max %s  %s%.1f s",
            server_round,
            self.rounds,
            f"{len(this_round)} institutions  AUC mean {sum(aucs) / len(aucs):.3f} (min {min(aucs):.3f})"
            if aucs
            else f"{len(this_round)} institutions released evaluation metrics",
            f"{max(epsilons):.3f}" if epsilons and math.isfinite(max(epsilons)) else "n/a (DP off)",
            f"{dropped_now} replies dropped  " if dropped_now else "",
            seconds,
            extra={"progress_round": (server_round, self.rounds, seconds)},  # the CLI adds the ETA
        )
        if self.tracker is not None:
            self.tracker.log_round(
                server_round, train=replies["train"], evaluate=replies["evaluate"], seconds=seconds, dropped=dropped_now
            )
        return None

    def _log_new_sigmas(self) -> None:
        """Each bank's noise multiplier as it reported it, once known (again when a bank re-plans it)."""
        sigmas = {
            name: float(metrics["noise-multiplier"])
            for name, metrics in sorted(self.trained.items())
            if "noise-multiplier" in metrics
        }
        new = {name: sigma for name, sigma in sigmas.items() if self._sigma_shown.get(name) != sigma}
        if new:
            progress.info("σ each bank planned for its target ε: %s", ", ".join(f"{n} {s:.3f}" for n, s in new.items()))
            self._sigma_shown.update(new)

    # --- output ----------------------------------------------------------------------------------

    def summary(self, *, extra: Mapping[str, Any]) -> dict[str, Any]:
        institutions = {}
        for name in sorted(self.latest):
            entry = _finite_only(dict(self.latest[name]))  # NaN (a class empty after the noise) -> null
            entry["n_train"] = int(entry["n_train"])
            entry["n_test"] = int(entry["n_test"])
            if entry.get("model_round") is not None:
                entry["model_round"] = int(entry["model_round"])
            entry["evaluated_round"] = entry.pop("round")
            institutions[name] = entry
        return {
            "institutions": institutions,
            "rounds": self.completed_rounds,
            "rounds_planned": self.rounds,
            "seconds_per_round": [round(s, 3) for s in self._round_seconds],
            "dropped_replies": self.dropped,
            **extra,
        }

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.output_dir / SUMMARY_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        if self.tracker is not None:
            self.tracker.finish(summary=summary)
        return path

    # --- resume (server/resume.py checkpoints this after every round) ------------------------------

    def export_state(self) -> dict[str, Any]:
        """The records so far, as JSON-safe values (non-finite numbers become null)."""
        return _finite_only(
            {
                "latest": self.latest,
                "trained": self.trained,
                "dropped": self.dropped,
                "completed_rounds": self.completed_rounds,
                "round_seconds": self._round_seconds,
            }
        )

    def restore_state(self, state: Mapping[str, Any], round_lines: list[str]) -> None:
        """Continue from an earlier run's records; ``rounds.jsonl`` gets its lines back, then grows as before."""
        self.latest = {
            name: {**entry, "epsilon": math.inf if entry.get("epsilon") is None else entry["epsilon"]}
            for name, entry in state["latest"].items()
        }
        self.trained = dict(state["trained"])
        self.dropped = list(state["dropped"])
        self.completed_rounds = int(state["completed_rounds"])
        self._round_seconds = [float(s) for s in state["round_seconds"]]
        self._rounds_path.write_text("".join(line + "\n" for line in round_lines), encoding="utf-8")

    def _record_dropped(self, server_round: int, phase: str, dropped: list[DroppedReply]) -> None:
        for item in dropped:
            record = {"round": server_round, "phase": phase, "institution": item.institution, "reason": item.reason}
            self.dropped.append(record)
            self._write({**record, "dropped": True})

    def _write(self, record: Mapping[str, Any]) -> None:
        clean = {k: (_json_number(v) if isinstance(v, float) else v) for k, v in record.items()}
        with self._rounds_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, allow_nan=False) + "\n")
