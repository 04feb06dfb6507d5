"""Experiment tracking: what the server records about each finished round, streamed to TensorBoard or MLflow.

``tracking.backend`` picks the writer (``none``: nothing is imported or written). The run's recorder
(``server/report.py``) hands over each finished round's numbers; a background thread writes them, so a slow or
broken tracker never holds up a round. Any tracking error is logged once, and tracking stops for the run: the run
itself never fails because of it. Only what the server already holds is sent: the whitelisted numbers banks
reply with (``shared/wire.py``), round times and counts, and the run's config.

Tags mirror ``rounds.jsonl``: ``train/<metric>/<institution>`` and ``evaluate/<metric>/<institution>`` per bank
(metric names as on the wire: ``auc``, ``pr-auc``, ``ece``, ``epsilon``, ``noise-multiplier``...), and
``round/<statistic>`` for the federation (mean and min AUC, max ε, seconds, dropped replies). Non-finite values
(ε without DP, an AUC a bank could not compute) are left out, as ``rounds.jsonl`` writes them as null.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedchurn.shared.config import FedChurnConfig, config_to_run_config, dump_config
from fedchurn.shared.wire import calibration_key

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # default folders, inside the run folder
MLFLOW_DIR = "mlflow"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "artifacts"
STATE_FILE = "tracking.json"  # the MLflow run a resumed run continues
QUEUE_SIZE = 10_000  # pending writes; beyond this, values are dropped (with a warning) rather than waited for
CLOSE_TIMEOUT_S = 60.0  # the most the end of a run waits for pending writes
MAX_NAME = 64
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value (older servers)
MLFLOW_BATCH_METRICS = 1000  # MLflow's log_batch limits
MLFLOW_BATCH_PARAMS = 100

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(text: str) -> str:
    """A tag component both backends accept: ``[A-Za-z0-9_-]``, at most 64 characters. A name that had to be
    changed gets a short hash of the original, so two different names never share a tag."""
    cleaned = _UNSAFE.sub("_", text).strip("_")[:MAX_NAME]
    if cleaned == text and cleaned:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[: MAX_NAME - 9] or 'name'}-{digest}"


def round_scalars(
    *,
    train: Mapping[str, Mapping[str, float]],
    evaluate: Mapping[str, Mapping[str, float]],
    seconds: float,
    dropped: int,
) -> dict[str, float]:
    """One finished round as tag -> value: each bank's reply metrics and the federation's statistics.

    ``train`` and ``evaluate``: institution -> the metrics its accepted reply carried this round."""
    values: dict[str, float] = {}
    for phase, replies in (("train", train), ("evaluate", evaluate)):
        for institution, metrics in replies.items():
            for metric, value in metrics.items():
                if calibration_key(metric) is None:  # per-bin reliability figures: in rounds.jsonl and the report
                    values[f"{phase}/{safe_name(metric)}/{safe_name(institution)}"] = _number(value)
    aucs = [_number(m.get("auc")) for m in evaluate.values()]
    aucs = [a for a in aucs if math.isfinite(a)]
    epsilons = [_number(m.get("epsilon")) for replies in (train, evaluate) for m in replies.values()]
    epsilons = [e for e in epsilons if math.isfinite(e)]
    values["round/seconds"] = _number(seconds)
    values["round/replies-dropped"] = float(dropped)
    values["round/institutions-trained"] = float(len(train))
    values["round/institutions-evaluated"] = float(len(evaluate))
    if aucs:
        values["round/auc-mean"] = sum(aucs) / len(aucs)
        values["round/auc-min"] = min(aucs)
    if epsilons:
        values["round/epsilon-max"] = max(epsilons)
    return {tag: value for tag, value in values.items() if math.isfinite(value)}


def _number(value: Any) -> float:
    """A float, or NaN for anything that is not a number (left out by the caller)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int beyond float
        return math.nan


# --- backends (each imports its library when it is built, on the tracking thread) -------------------------


class Backend(Protocol):
    def start(self, *, params: Mapping[str, str], config_yaml: str) -> None: ...

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def finish(self, *, summary_json: str | None, status: str) -> None: ...


class TensorBoardBackend:
    """Event files for ``tensorboard --logdir``: scalars per round, the config and summary as text."""

    def __init__(self, logdir: Path) -> None:
        from tensorboardX import SummaryWriter  # imported only when asked for

        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=str(logdir))

    def start(self, *, params: Mapping[str, str], config_yaml: str) -> None:
        self.writer.add_text("config", _markdown_code(config_yaml), 0)
        self.writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run that crashes later keeps its rounds

    def finish(self, *, summary_json: str | None, status: str) -> None:
        if summary_json is not None:
            self.writer.add_text("summary", _markdown_code(summary_json))
        self.writer.add_text("status", status)  # FINISHED, or FAILED for a run that ended without a summary
        self.writer.close()


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: an indented block shows it verbatim."""
    return "\n".join("    " + line for line in text.splitlines())


class MlflowBackend:
    """One MLflow run per fedchurn run, through the MLflow client: a local SQLite store in the run folder by
    default (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db``), or a tracking server."""

    def __init__(
        self,
        *,
        uri: str,
        artifact_location: str | None,
        experiment: str,
        run_name: str,
        state_path: Path,
        resume: bool,
    ) -> None:
        # MLflow's store chatter (schema migrations, its ORM's deprecations) is not the run's business.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient  # imported only when asked for

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )
        earlier = self._earlier_run(state_path) if resume else None
        self.resumed = earlier is not None
        if earlier is not None:
            self.run_id: str = earlier
            self.client.update_run(earlier, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={"fedchurn.run": run_name})
            self.run_id = run.info.run_id
            state_path.write_text(json.dumps({"mlflow_run_id": self.run_id}) + "\n", encoding="utf-8")

    def _earlier_run(self, state_path: Path) -> str | None:
        """The MLflow run an interrupted run wrote to (``federation.resume``), if the store still has it."""
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, or unreadable: start a new run
            return None
        run_id = state.get("mlflow_run_id") if isinstance(state, dict) else None
        if not isinstance(run_id, str):
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # not in this store (deleted, another store): start a new run
            return None
        return run_id

    def start(self, *, params: Mapping[str, str], config_yaml: str) -> None:
        from mlflow.entities import Param

        if self.resumed:  # parameters cannot change: keep the first run's, log only new keys
            known = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in known}
        items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + MLFLOW_BATCH_PARAMS])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(tag, value, now, step) for tag, value in values.items()]
        for i in range(0, len(items), MLFLOW_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + MLFLOW_BATCH_METRICS])

    def finish(self, *, summary_json: str | None, status: str) -> None:
        if summary_json is not None:
            self.client.log_text(self.run_id, summary_json, "summary.json")
        self.client.set_terminated(self.run_id, status=status)


# --- the thread that writes ---------------------------------------------------------------------------------

_STOP = object()


class Tracker:
    """Runs a backend's writes on a daemon thread, in order. Never raises into the run and never blocks a round:
    the first error (the library missing, the store unreachable) is logged once and tracking stops; a full queue
    drops values with one warning. ``finish`` waits at most ``close_timeout_s`` for what is pending."""

    def __init__(
        self,
        open_backend: Callable[[], Backend],
        *,
        label: str,
        queue_size: int = QUEUE_SIZE,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.label = label
        self.close_timeout_s = close_timeout_s
        self.failed = False
        self._open_backend = open_backend
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._warned_full = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="fedchurn-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    def start(self, *, params: Mapping[str, str], config_yaml: str) -> None:
        self._submit(lambda backend: backend.start(params=dict(params), config_yaml=config_yaml))

    def log_round(
        self,
        step: int,
        *,
        train: Mapping[str, Mapping[str, float]],
        evaluate: Mapping[str, Mapping[str, float]],
        seconds: float,
        dropped: int,
    ) -> None:
        """One finished round (``round_scalars``), computed and written on the tracking thread."""
        train, evaluate = dict(train), dict(evaluate)
        self._submit(
            lambda backend: backend.scalars(
                step, round_scalars(train=train, evaluate=evaluate, seconds=seconds, dropped=dropped)
            )
        )

    def finish(self, *, summary: Mapping[str, Any] | None = None, status: str = "FINISHED") -> bool:
        """Send the summary, end the run in the tracker and wait for the writes; True when all were written."""
        if self._closed:
            return not self.failed
        text = None
        if summary is not None:
            try:
                text = json.dumps(summary, indent=2, allow_nan=False, default=str)
            except ValueError:
                text = None
        self._submit(lambda backend: backend.finish(summary_json=text, status=status))
        return self._close()

    def _close(self) -> bool:
        self._closed = True
        atexit.unregister(self._at_exit)
        deadline = time.monotonic() + self.close_timeout_s
        with contextlib.suppress(queue.Full):  # the thread is stuck: the join below gives up in time
            self._queue.put(_STOP, timeout=self.close_timeout_s)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning(
                "%s tracking: writes still pending after %.0f s; the run goes on without them",
                self.label,
                self.close_timeout_s,
            )
            return False
        return not self.failed

    def _at_exit(self) -> None:
        """The run ended without a summary (an error, Ctrl-C): mark the tracked run as failed, briefly."""
        if not self._closed:
            self.close_timeout_s = min(self.close_timeout_s, 5.0)
            self._submit(lambda backend: backend.finish(summary_json=None, status="FAILED"))
            self._close()

    def _submit(self, task: Callable[[Backend], None]) -> None:
        if self._closed or self.failed:
            return
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            if not self._warned_full:
                self._warned_full = True
                logger.warning("%s tracking cannot keep up: some values are not written", self.label)

    def _work(self) -> None:
        backend: Backend | None = None
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            if self.failed:
                continue
            try:
                if backend is None:
                    backend = self._open_backend()
                task(backend)
            except ImportError as exc:
                self._fail(f"{exc}; install it with: pip install 'fedchurn[tracking]'")
            except Exception as exc:  # tracking never fails a run: any error ends tracking, not the run
                self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        self.failed = True
        logger.warning("%s tracking stopped (the run goes on): %s", self.label, reason)


# --- from the config ----------------------------------------------------------------------------------------


def tracking_directory(config: FedChurnConfig, output_dir: Path) -> Path:
    """The local store: ``tracking.directory`` (relative: inside the run folder), else the backend's default."""
    default = TENSORBOARD_DIR if config.tracking.backend == "tensorboard" else MLFLOW_DIR
    return output_dir / Path(config.tracking.directory or default).expanduser()


def start_tracking(config: FedChurnConfig, output_dir: Path, *, run_name: int | str) -> Tracker | None:
    """A started tracker for the run, with its config logged; None for ``tracking.backend: none`` (or when it
    cannot even start: logged, and the run goes on untracked)."""
    if config.tracking.backend == "none":
        return None
    try:
        return _start(config, output_dir, name=str(run_name))
    except Exception as exc:  # tracking never fails a run
        logger.warning("%s tracking not started (the run goes on): %s", config.tracking.backend, exc)
        return None


def _start(config: FedChurnConfig, output_dir: Path, *, name: str) -> Tracker:
    settings = config.tracking
    directory = tracking_directory(config, output_dir)
    open_backend: Callable[[], Backend]
    if settings.backend == "tensorboard":
        logdir = directory / safe_name(name)

        def open_backend() -> Backend:
            return TensorBoardBackend(logdir)

        label = "TensorBoard"
    else:
        local = settings.mlflow_uri is None
        uri = settings.mlflow_uri or f"sqlite:///{(directory / MLFLOW_DB).resolve()}"
        artifacts = (directory / MLFLOW_ARTIFACTS).resolve().as_uri() if local else None

        def open_backend() -> Backend:
            if local:
                directory.mkdir(parents=True, exist_ok=True)
            return MlflowBackend(
                uri=uri,
                artifact_location=artifacts,
                experiment=settings.experiment,
                run_name=name,
                state_path=output_dir / STATE_FILE,
                resume=config.federation.resume,
            )

        label = "MLflow"
    params = {key: _param_text(value) for key, value in config_to_run_config(config).items()}
    config_yaml = dump_config(config)
    tracker = Tracker(open_backend, label=label)  # last: nothing after it can fail and leave it running
    tracker.start(params=params, config_yaml=config_yaml)
    # A server URI may carry credentials: not logged.
    logger.info("tracking this run with %s (%s)", label, "a tracking server" if settings.mlflow_uri else directory)
    return tracker


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
