"""A real federation on loopback for tests: SuperLink + SuperNodes as processes, TLS and node authentication.

Every process is started in its own session, on ports chosen here, with files under a temporary folder; ``close``
kills each process this harness started and every descendant it spawned (Flower's SuperExec and app processes),
by process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedchurn.deployment.federation import (
    flower_environment,
    free_port,
    list_nodes,
    register_node,
    wait_for_superlink,
    write_connection,
)
from fedchurn.deployment.pki import create_ca, create_node_key, create_server_cert
from fedchurn.shared.config import SyntheticConfig
from fedchurn.shared.institution_rows import write_csv
from fedchurn.shared.synthetic_consortium import generate_synthetic_institution

CONNECTION = "test-federation"
ROOT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a process this harness started and all its descendants, by id."""
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class Federation:
    def __init__(self, root: Path, banks: list[str], *, min_rows: int = 300, max_rows: int = 600) -> None:
        self.root = root
        self.banks = banks
        self.flwr_home = root / "flwr-home"
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        create_ca(root / "pki" / "ca")
        create_server_cert(root / "pki" / "ca", root / "pki" / "superlink")
        self.ca = root / "pki" / "superlink" / "ca.crt"
        synthetic = SyntheticConfig(institutions=len(banks), min_rows=min_rows, max_rows=max_rows)
        for index, bank in enumerate(banks):
            create_node_key(root / bank / "keys", bank)
            table = generate_synthetic_institution(synthetic, index, seed=0)
            write_csv(table, root / bank / "customers.csv")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[Any]:
        log = (self.root / f"{name}.log").open("a")
        process = subprocess.Popen(
            [sys.executable, "-m", "fedchurn.cli.main", *args],
            cwd=ROOT,
            env=flower_environment(self.flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                "superlink",
                "--tls",
                str(self.root / "pki" / "superlink"),
                "--database",
                str(self.root / "link.db"),
                "--port",
                str(self.port),
            ],
        )
        wait_for_superlink(self.address, self.ca, wait_s=60)
        write_connection(self.flwr_home, CONNECTION, address=self.address, ca_cert=self.ca)

    def register(self, bank: str) -> None:
        register_node(self.flwr_home, CONNECTION, self.root / bank / "keys" / "node-auth.pub", name=bank)

    def start_supernode(
        self, bank: str, *, max_wait_s: float = 300, institution: str | None = None
    ) -> subprocess.Popen[Any]:
        """Start ``bank``'s SuperNode with its key and data; ``institution``: the name it claims (an impostor's)."""
        return self._start(
            bank,
            [
                "supernode",
                "--institution",
                institution or bank,
                "--superlink",
                self.address,
                "--ca",
                str(self.ca),
                "--key",
                str(self.root / bank / "keys" / "node-auth.key"),
                "--data",
                str(self.root / bank / "customers.csv"),
                "--state-dir",
                str(self.root / bank / "state"),
                "--runtime-port",
                str(free_port()),
                "--wait",
                "30",
                "--max-retries",
                "100",
                "--max-wait",
                str(max_wait_s),
            ],
        )

    def wait_online(self, count: int, *, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            online = [n for n in list_nodes(self.flwr_home, CONNECTION) if n.get("status") == "online"]
            if len(online) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout_s} s; logs in {self.root}")

    def start_run(self, name: str, config: Path, *extra: str) -> subprocess.Popen[Any]:
        return self._start(
            name,
            [
                "run",
                str(config),
                "--federation",
                CONNECTION,
                "--flwr-home",
                str(self.flwr_home),
                "--out",
                str(self.root / "out"),
                "--timeout",
                "900",
                *extra,
            ],
        )

    def records(self) -> list[dict[str, Any]]:
        path = self.root / "out" / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def wait_for(self, predicate: Any, *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} did not happen within {timeout_s} s; logs in {self.root}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for process in self.processes.values():
            kill_tree(process)
