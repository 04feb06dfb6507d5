"""One local Ray for many simulations: a Ray head started once, in its own process, and stopped by its pid.

Flower's Ray backend shuts Ray down at the end of every simulation. A Ray started inside this process would go
with it, and the next simulation would pay Ray's start-up again. A head started with ``ray start --head --block``
in a child process outlives those shutdowns: each simulation attaches to it by address and only disconnects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedchurn.shared.errors import SimulationError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

# Set before Flower or Ray start: no telemetry, and never let a SuperLink pip-install the app's
# dependencies at run time (that pulled a 5 GB CUDA torch onto a CPU machine).
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # opt in to Ray's coming default; silences its warning
}


def quiet_environment() -> None:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, SIGTERM the head when the process that started it dies (even by
    SIGKILL), so an interrupted comparison never leaves a Ray behind. Elsewhere ``stop()`` is the only way."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")  # the ray of this interpreter's environment
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise SimulationError("the 'ray' command is not installed next to this Python: pip install 'ray[default]'")
    return found


def own_session_dir() -> Path | None:
    """The session folder (``<temp dir>/session_<date>_<pid>``) of the Ray this process started with
    ``ray.init()``: read while Ray runs (Flower's backend shuts Ray down before the run returns). None when it
    cannot be told (Ray's node object is internal; a Ray version without it just leaves its folder)."""
    try:
        import ray

        node = ray._private.worker._global_node
        path = node.get_session_dir_path() if node is not None else None
    except Exception:  # an internal attribute: absent or renamed in another Ray version
        logger.debug("could not tell Ray's session folder; it is left in place", exc_info=True)
        return None
    return Path(path) if path else None


def remove_session_dir(session_dir: Path | None) -> None:
    """After ``ray.shutdown()``: remove the session folder a local Ray of this process wrote (logs, sockets,
    runtime environments), and the ``session_latest`` link beside it when it points there. Only that path: other
    sessions in the same temp dir (other runs, a cluster this process attached to) are not touched."""
    if session_dir is None or not session_dir.name.startswith("session_") or not session_dir.is_dir():
        return
    latest = session_dir.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.readlink(latest)).name == session_dir.name:
            latest.unlink()
    shutil.rmtree(session_dir, ignore_errors=True)
    logger.debug("removed Ray's session folder %s", session_dir)


class RayHead:
    """``with RayHead(num_cpus=2) as head: run_simulation(..., ray_address=head.address)``."""

    def __init__(self, *, num_cpus: int, log_path: Path) -> None:
        self.num_cpus = num_cpus
        self.log_path = log_path
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._temp_dir: str | None = None

    def __enter__(self) -> RayHead:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        env = {**os.environ, **QUIET_ENVIRONMENT}
        project_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH", "")) if p)
        # Its own temp dir: `ray start` records its address there (ray_current_cluster), and a plain ray.init()
        # reading the default temp dir would otherwise try to join this head long after it is gone.
        self._temp_dir = tempfile.mkdtemp(prefix="fedchurn-ray-")
        command = [
            _ray_executable(),
            "start",
            "--head",
            "--block",
            f"--temp-dir={self._temp_dir}",
            f"--port={port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Its own session: stopping it later signals this head's process group and nothing else.
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_until_up(self._process)
        except BaseException:
            self.stop()
            raise
        logger.info("Ray head at %s (pid %d, %d CPUs)", self.address, self._process.pid, self.num_cpus)
        return self

    def _wait_until_up(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-600:]
                raise SimulationError(f"could not start a local Ray head (exit {process.returncode}): {tail}")
            host, port = self.address.split(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    time.sleep(2.0)  # the GCS listens before the raylet has registered
                    return
            except OSError:
                time.sleep(0.5)
        raise SimulationError(f"a local Ray head did not come up within {START_TIMEOUT_S:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                self._terminate(process)
        finally:
            temp_dir, self._temp_dir = self._temp_dir, None
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the head's process group (the head and every Ray process it started), wait until the group is
        empty, SIGKILL what is left after STOP_TIMEOUT_S."""
        group = process.pid  # its own session: group id = its pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            process.poll()  # reap the head itself
            try:
                os.killpg(group, 0)  # raises once no process of the group is left
            except ProcessLookupError:
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait(timeout=10)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
