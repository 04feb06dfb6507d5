"""A two-node Ray cluster on this machine: pretraining and a simulation attached to it run on both nodes.

Only the processes this test starts are stopped: each node runs in its own session (process group) under a
temp dir unique to the test, and teardown ends those processes by id. (`ray stop` would end every Ray on the
machine, other users' included.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedchurn.shared.config import FedChurnConfig, SyntheticConfig, default_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_using(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def _ray(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen(
        [ray_cli, "start", *args, "--block", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    temp_dir = f"/tmp/fcrc{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    started = [
        _ray("--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}", "--include-dashboard=false", env=env)
    ]
    address = f"127.0.0.1:{port}"
    try:
        import ray

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(2)
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                break
            except Exception:
                continue
        else:
            pytest.fail("the head node did not start")
        started.append(_ray(f"--address={address}", "--num-cpus=1", env=env))
        deadline = time.monotonic() + 60
        while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert sum(1 for n in ray.nodes() if n["Alive"]) == 2, "the second node did not join"
        ray.shutdown()
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(1)
        for pid in _pids_using(temp_dir):  # anything of this cluster still alive: ours, by id
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _config(tmp_path: Path) -> FedChurnConfig:
    base = default_config()
    return dataclasses.replace(
        base,
        rounds=1,
        output_dir=str(tmp_path / "run"),
        data=dataclasses.replace(base.data, synthetic=SyntheticConfig(institutions=2, min_rows=300, max_rows=400)),
        pretrain=dataclasses.replace(base.pretrain, source_rows=2000, epochs=2, num_workers=2),
    )


def test_pretraining_runs_on_both_nodes(cluster: str, tmp_path: Path) -> None:
    from fedchurn.pretraining.trainer import pretrain_encoder

    result = pretrain_encoder(_config(tmp_path), out_dir=tmp_path / "enc", ray_address=cluster)
    workers = result.metadata["workers"]
    assert workers["count"] == 2
    assert workers["distinct_nodes"] == 2, workers  # one worker per 1-CPU node: both nodes trained


def test_simulation_attached_to_the_cluster_uses_both_nodes(cluster: str, tmp_path: Path) -> None:
    import ray

    from fedchurn.simulation.driver import plan_simulation, run_simulation

    summary = run_simulation(plan_simulation(_config(tmp_path)), ray_address=cluster)
    assert sorted(summary["institutions"]) == ["bank-01", "bank-02"]
    ray.init(address=cluster, logging_level="ERROR", log_to_driver=False)
    try:
        # The GCS's actor table (dead actors included); the state API would need the dashboard.
        table = ray._private.state.actors()
        nodes = {a["Address"]["NodeID"] for a in table.values() if "ClientAppActor" in a.get("ActorClassName", "")}
    finally:
        ray.shutdown()
    assert len(nodes) == 2, nodes  # Flower's actor pool spread over both 1-CPU nodes
