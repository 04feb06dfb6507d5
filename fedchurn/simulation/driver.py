"""`fedchurn simulate`: a federation of virtual institutions on Flower's Ray backend, in one process tree.

This module composes both sides (it imports the ServerApp and the ClientApp), so the imports are inside the
functions: nothing on the server or client path imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.splits import UnbalancedSplitError
from fedchurn.shared.config import FedChurnConfig, config_to_run_config
from fedchurn.shared.errors import FedChurnError, SimulationError
from fedchurn.shared.institution_rows import institution_names
from fedchurn.shared.partitions import remove_partitions, stage_partitions
from fedchurn.simulation.delta_check import check_delta_for_rows, training_rows
from fedchurn.simulation.ray_head import QUIET_ENVIRONMENT, own_session_dir, quiet_environment, remove_session_dir

logger = logging.getLogger(__name__)
progress = logging.getLogger("fedchurn.progress")


@dataclass(frozen=True)
class SimulationPlan:
    config: FedChurnConfig  # output_dir made absolute
    institutions: tuple[str, ...]
    data_seconds: float = 0.0  # the data stage: one read, checks, partitions written


def plan_simulation(config: FedChurnConfig, *, check_data: bool = True) -> SimulationPlan:
    """Resolve the institutions and check every institution's data before any process starts.

    Failing here, with the file, line and column, beats a failure inside a Ray worker halfway through. A table
    is read once: its checked rows are staged per institution under the output folder (shared/partitions.py),
    where each worker memory-maps its own; ``run_simulation`` removes them when the run ends.
    """
    output_dir = str(Path(config.output_dir).expanduser().resolve())
    from fedchurn.shared.provenance import check_transfer_setup

    config = dataclasses.replace(config, output_dir=output_dir)
    check_transfer_setup(config)  # a federated transfer mode; a pretrained encoder that fits the schema
    started = time.perf_counter()
    if check_data and config.data.source == "csv":
        stage_partitions(config.data, output_dir)
    try:
        names = institution_names(config.data, seed=config.seed, output_dir=output_dir)
        if not names:
            raise SimulationError("the data holds no institutions")
        sizes: dict[str, int] = {}
        if check_data and config.data.source == "csv":
            for name in names:
                # Splits and preprocessing from the staged rows. The split here is not the bank's (each bank
                # splits with its own secret key), so an unbalanced part here says nothing about the bank's.
                with contextlib.suppress(UnbalancedSplitError):
                    sizes[name] = len(prepare_institution(config, name).y_train)
        if check_data and config.privacy.enabled:  # δ below 1/n for every bank, said here rather than by declines
            check_delta_for_rows(config, training_rows(config, names, sizes))
    except BaseException:
        remove_partitions(output_dir)
        raise
    return SimulationPlan(config=config, institutions=tuple(names), data_seconds=time.perf_counter() - started)


def discard_plan(plan: SimulationPlan) -> None:
    """Remove what planning staged (customers' rows) when the plan is not run."""
    remove_partitions(plan.config.output_dir)


def _trained_any(output_dir: Path) -> bool:
    """Whether any institution's training reply was accepted (``rounds.jsonl``, phase ``train``)."""
    path = output_dir / "rounds.jsonl"
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as lines:
        records = (json.loads(line) for line in lines if line.strip())
        return any(r.get("phase") == "train" and "reason" not in r for r in records)  # dropped replies: a reason


def _connect_ray(config: FedChurnConfig, *, ray_address: str | None) -> bool:
    """Attach to a cluster or start a bounded local Ray. Returns True when this call started Ray."""
    import ray

    quiet_environment()
    if ray.is_initialized():
        return False
    # Workers must import this project's packages, whether installed or run from a checkout.
    project_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **QUIET_ENVIRONMENT}}
    address = ray_address or config.simulation.ray_address
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
        else:
            num_cpus = config.simulation.ray_num_cpus or os.cpu_count() or 1
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ... on start-up
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SimulationError(f"could not start {where}: {exc}") from None
    return True


def _check_resources(config: FedChurnConfig) -> None:
    """An actor pool that fits no actor makes Flower wait forever: refuse it up front."""
    import ray

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0))
    sim = config.simulation
    if sim.client_num_cpus > cpus:
        raise SimulationError(
            f"simulation.client_num_cpus = {sim.client_num_cpus} but the Ray cluster has {cpus:g} CPUs: "
            "lower it or give Ray more CPUs (simulation.ray_num_cpus)"
        )
    if sim.client_num_gpus > 0 and sim.client_num_gpus > gpus:
        raise SimulationError(
            f"simulation.client_num_gpus = {sim.client_num_gpus} but the Ray cluster has {gpus:g} GPUs: "
            "set it to 0 on a machine without a GPU, or attach to a cluster with GPUs (--ray-address)"
        )


def stop_now(code: int = 130) -> None:
    """Exit at once: end every process this one started (Ray, Flower workers), by id, then this one."""
    from fedchurn.deployment.processes import descendants

    for pid in reversed(descendants(os.getpid())):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    os._exit(code)


@contextlib.contextmanager
def _interruptible(stop: threading.Event) -> Iterator[None]:
    """While the simulation runs, a first Ctrl-C asks the server to stop after the round under way (which is
    then checkpointed); a second one ends everything at once, without a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            progress.warning("Interrupted again: stopping now. The last completed round is checkpointed.")
            stop_now()
        stop.set()
        progress.warning(
            "Interrupted: stopping after the round under way, once it is checkpointed (Ctrl-C again: stop now)."
        )

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _recording_members(members: dict[int, str], institutions: tuple[str, ...]) -> Iterator[None]:
    """While the simulation starts, record which institution each node Flower creates is: the partition id Flower
    gives node ``i`` is ``i``, and the client app names partition ``i`` ``institutions[i]`` (clients/institution.py).
    The server then refuses a reply naming another institution than its node's, as in a real federation."""
    from flwr.server.superlink.fleet.vce import vce_api

    register = vce_api._register_nodes

    def recording(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping = register(num_nodes, state_factory)
        members.update({node: institutions[partition] for node, partition in mapping.items()})
        return mapping

    vce_api._register_nodes = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api._register_nodes = register


def run_simulation(plan: SimulationPlan, *, ray_address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run the planned federation and return the summary the server wrote."""
    quiet_environment()
    import ray
    from flwr.simulation import run_simulation as flower_run_simulation

    from fedchurn.clients.app import make_client_app
    from fedchurn.server.app import make_server_app
    from fedchurn.server.report import SUMMARY_FILE

    config = plan.config
    run_config = config_to_run_config(config)
    output_dir = Path(config.output_dir)
    summary_path = output_dir / SUMMARY_FILE
    if summary_path.exists():
        summary_path.unlink()  # stale results must not pass for this run's

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    started_ray = _connect_ray(config, ray_address=ray_address)
    own_ray = started_ray and not (ray_address or config.simulation.ray_address)  # a local Ray, not a cluster's
    session_dir = own_session_dir() if own_ray else None
    try:
        _check_resources(config)
        backend_config: dict[str, Any] = {
            "client_resources": {
                "num_cpus": config.simulation.client_num_cpus,
                "num_gpus": config.simulation.client_num_gpus,
            },
        }
        members: dict[int, str] = {}  # node id -> institution, known once Flower creates the nodes
        stop = threading.Event()  # Ctrl-C: end after the round under way, once it is checkpointed
        with _recording_members(members, plan.institutions), _interruptible(stop):
            flower_run_simulation(
                server_app=make_server_app(run_config, members=members, stop=stop, warm_up=len(plan.institutions)),
                client_app=make_client_app(run_config),
                num_supernodes=len(plan.institutions),
                backend_name="ray",
                backend_config=backend_config,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    except FedChurnError:
        raise  # already says what is wrong and how to fix it
    except Exception as exc:
        raise SimulationError(f"the simulation failed: {exc}") from exc
    finally:
        # Flower's Ray backend shuts Ray down itself; make sure a Ray we started does not outlive the run.
        if started_ray and ray.is_initialized():
            ray.shutdown()
        remove_session_dir(session_dir)  # its logs and sockets must not pile up under the temp dir, run after run
        remove_partitions(output_dir)  # the staged rows must not outlive the run
    if not summary_path.exists():
        raise SimulationError(f"the simulation ended without writing {summary_path}; run with --verbose to see why")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    from fedchurn.reporting import write_report_safely

    write_report_safely(output_dir)  # report.html; a failure is logged, never the run's
    if not summary["institutions"] and not _trained_any(output_dir):
        # (With evaluation off no metrics leave the banks, so the summary lists none: training is what counts.)
        reasons = "; ".join(f"{d['institution']}: {d['reason']}" for d in summary["dropped_replies"][:5])
        raise SimulationError(f"no institution completed a round. {reasons}")
    return summary
