"""A real federation: the SuperLink, each institution's SuperNode, and runs submitted to them (Flower 1.42).

What Flower 1.42 expects, from its source:

- ``flower-superlink`` serves its Fleet, Control and Runtime APIs over HTTPS on one ``--host``/``--port``, with
  ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; ``--enable-supernode-auth`` admits only SuperNodes whose
  public key was registered (``flwr supernode register KEY CONNECTION``); ``--database FILE`` keeps runs and
  registrations across restarts.
- ``flower-supernode --superlink HOST:PORT --root-certificates CA --auth-supernode-private-key KEY
  --node-config "..." --port P`` (P: its own local Runtime API port, one per SuperNode on a machine);
  ``--max-retries``/``--max-wait-time`` bound its reconnection attempts.
- The ``flwr`` CLI reads SuperLink connections from ``$FLWR_HOME/config.toml`` (``address``,
  ``root-certificates``); no ``flwr login`` is needed when the SuperLink has no account authentication.

Here: the commands, the environment they run in, and checks that fail fast and clearly (missing file, wrong
key, unreachable address) before a Flower process starts. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedchurn.deployment.members import node_of_key, record_member
from fedchurn.deployment.pki import (
    check_node_public_key,
    check_pem_certificate,
)
from fedchurn.shared.config import is_valid_institution_name
from fedchurn.shared.errors import FedChurnError

# Every Flower process we start runs with these: no telemetry, and never a run-time `pip install` of the app's
# dependencies (a SuperLink would otherwise pull a 5 GB CUDA torch onto a CPU machine).
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_RUNTIME_PORT = 9094
DEFAULT_CONNECT_TIMEOUT_S = 5.0
FLWR_HOME_ENV = "FLWR_HOME"
FLWR_CONFIG_FILE = "config.toml"
CLI_TIMEOUT_S = 60.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = Path(sys.executable).parent  # where this install's console scripts (flwr, flower-superlink) live


class FederationError(FedChurnError):
    """A federation process cannot be started, reached or used."""


def flower_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment plus ``FLOWER_ENVIRONMENT`` (and ``FLWR_HOME`` when given)."""
    env = dict(os.environ)
    env.update(FLOWER_ENVIRONMENT)
    # Flower's processes start one another by name (the SuperLink its flwr-serverapp, ...): find this install's
    # first, also when its environment was never activated (``.venv/bin/python -m ...``).
    scripts = str(SCRIPTS_DIR)
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (scripts, env.get("PATH", "")) if p)
    if flwr_home is not None:
        env[FLWR_HOME_ENV] = str(flwr_home)
    return env


def find_executable(name: str) -> str | None:
    """The full path of a command installed with this Python (beside the interpreter, whether or not its
    environment is activated), else found on PATH; None when neither has it."""
    beside = SCRIPTS_DIR / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def executable(name: str) -> str:
    """The full path of a Flower command, or a clear error when Flower is not installed here."""
    found = find_executable(name)
    if found is None:
        raise FederationError(f"'{name}' not found on PATH: install the project (pip install -e .) in this Python")
    return found


# --- addresses ------------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); a clear error otherwise."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise FederationError(f"address {address!r} must look like HOST:PORT, e.g. 127.0.0.1:{DEFAULT_SUPERLINK_PORT}")
    return host, int(port_text)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for tests and local demos)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_port_free(host: str, port: int, *, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free; one being listened on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError as exc:
            raise FederationError(
                f"{what}: cannot listen on {host}:{port} ({exc.strerror}); is another process using it? "
                "choose another port"
            ) from None


def probe_superlink(address: str, ca_cert: Path, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Open a TLS connection to the SuperLink and verify its certificate against the consortium CA.

    Raises a FederationError that says which step failed: name resolution, TCP connection, or TLS verification.
    """
    host, port = parse_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        raise FederationError(
            f"the SuperLink at {address} answered, but its TLS certificate fails verification with {ca_cert}: "
            f"{exc.verify_message}; is this the consortium's CA, and does the certificate name '{host}'?"
        ) from None
    except ssl.SSLError as exc:
        raise FederationError(f"TLS handshake with {address} failed ({exc.reason}); is it a TLS SuperLink?") from None
    except socket.gaierror as exc:
        raise FederationError(f"cannot resolve SuperLink host '{host}': {exc.strerror}") from None
    except TimeoutError:
        raise FederationError(f"SuperLink at {address} did not answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise FederationError(f"cannot reach the SuperLink at {address}: {exc.strerror or exc}") from None


def wait_for_superlink(address: str, ca_cert: Path, *, wait_s: float, interval_s: float = 1.0) -> None:
    """``probe_superlink`` until it succeeds or ``wait_s`` has passed (then its last error, with the wait)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            probe_superlink(address, ca_cert, timeout_s=min(DEFAULT_CONNECT_TIMEOUT_S, max(wait_s, 0.5)))
            return
        except FederationError as exc:
            if time.monotonic() + interval_s > deadline:
                waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                raise FederationError(f"{exc}{waited}") from None
        time.sleep(interval_s)


# --- SuperLink ------------------------------------------------------------------------------------


def default_flwr_home() -> Path:
    configured = os.environ.get(FLWR_HOME_ENV)
    return Path(configured) if configured else Path.home() / ".flwr"


def write_connection(flwr_home: Path, name: str, *, address: str, ca_cert: Path, make_default: bool = True) -> Path:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml``, keeping the others."""
    import tomli_w

    if not is_valid_institution_name(name) or " " in name or "." in name:
        raise FederationError(f"connection name {name!r}: use letters, digits, - and _")
    parse_address(address)
    check_pem_certificate(ca_cert, "consortium CA certificate")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / FLWR_CONFIG_FILE
    values: dict[str, Any] = {}
    if path.is_file():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise FederationError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    superlink = values.setdefault("superlink", {})
    superlink[name] = {"address": address, "root-certificates": str(ca_cert.resolve())}
    if make_default or "default" not in superlink:
        superlink["default"] = name
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(tomli_w.dumps(values), encoding="utf-8")
    os.replace(temporary, path)  # never half a config.toml
    return path


@dataclass(frozen=True)
class Connection:
    name: str
    address: str
    ca_cert: Path


def read_connection(flwr_home: Path, name: str) -> Connection:
    path = flwr_home / FLWR_CONFIG_FILE
    if not path.is_file():
        raise FederationError(
            f"no Flower config at {path}: add the federation first (fedchurn federation connect {name} ...)"
        )
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FederationError(f"{path} is not valid TOML ({exc})") from None
    entry = values.get("superlink", {}).get(name)
    if not isinstance(entry, dict) or "address" not in entry:
        known = [k for k, v in values.get("superlink", {}).items() if isinstance(v, dict)]
        raise FederationError(f"federation {name!r} is not in {path} (known: {', '.join(known) or 'none'})")
    if entry.get("insecure"):
        raise FederationError(f"federation {name!r} in {path} is marked insecure: fedchurn runs only over TLS")
    ca = entry.get("root-certificates")
    if not ca:
        raise FederationError(f"federation {name!r} in {path} names no root-certificates (the consortium CA)")
    return Connection(name=name, address=str(entry["address"]), ca_cert=Path(str(ca)))


def run_flwr(args: Sequence[str], *, flwr_home: Path, timeout_s: float = CLI_TIMEOUT_S) -> str:
    """Run a ``flwr`` CLI command; its stdout, or a FederationError with its own message."""
    try:
        done = subprocess.run(
            [executable("flwr"), *args],
            env=flower_environment(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(f"'flwr {' '.join(args[:2])}' did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        message = (done.stdout + done.stderr).strip().splitlines()
        raise FederationError(f"'flwr {' '.join(args[:2])}' failed: {' / '.join(message[-4:])}")
    return done.stdout


def _json_tail(text: str) -> Any:
    """The JSON document flwr's ``--format json`` prints (after any log lines)."""
    start = text.find("{")
    if start < 0:
        raise FederationError(f"flwr printed no JSON: {text.strip()[:200]}")
    return json.loads(text[start:])


def register_node(
    flwr_home: Path, connection: str, public_key: Path, *, name: str | None = None, node_id: int | None = None
) -> int | None:
    """Register an institution's public key with the SuperLink: the node id it will have, or None when this key
    is registered already (registering is idempotent). With ``name``, the node is recorded in the member
    registry as that institution (``fedchurn/deployment/members.py``); ``node_id`` names the node of a key the SuperLink
    already knows but the registry does not."""
    check_node_public_key(public_key)
    conn = read_connection(flwr_home, connection)
    probe_superlink(conn.address, conn.ca_cert)
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    result = _json_tail(run_flwr(args, flwr_home=flwr_home))
    registered: int | None
    if not result.get("success") and "already in use" in str(result.get("error-message", "")):
        registered = None
    elif not result.get("success"):
        raise FederationError(f"the SuperLink refused the key {public_key}: {result.get('error-message', result)}")
    else:
        registered = int(result["node-id"])
    if name:
        node = registered if registered is not None else node_of_key(flwr_home, connection, public_key) or node_id
        if node is None:
            raise FederationError(
                f"the SuperLink knows the key {public_key} already, but the member registry does not: give its node "
                f"id (flwr supernode ls {connection}) with --node-id so its replies can be tied to {name!r}"
            )
        record_member(flwr_home, connection, node_id=node, institution=name, public_key=public_key)
    return registered


def list_nodes(flwr_home: Path, connection: str) -> list[dict[str, Any]]:
    """The SuperLink's nodes (``flwr supernode ls --format json``): node-id, status, ..."""
    result = _json_tail(run_flwr(["supernode", "ls", connection, "--format", "json"], flwr_home=flwr_home))
    nodes = result.get("nodes", [])
    return list(nodes) if isinstance(nodes, list) else []


def _toml_run_config(run_config: Mapping[str, Any]) -> str:
    import tomli_w

    return tomli_w.dumps(dict(run_config))


def run_command(
    connection: str, run_config: Mapping[str, Any], *, config_file: Path, stream: bool, app_dir: Path = PROJECT_ROOT
) -> list[str]:
    """``flwr run APP CONNECTION --run-config FILE``: the run-config is written to ``config_file`` first."""
    if not (app_dir / "pyproject.toml").is_file():
        raise FederationError(f"{app_dir} holds no pyproject.toml: 'fedchurn run' needs the project's source tree")
    config_file.write_text(_toml_run_config(run_config), encoding="utf-8")
    command = [executable("flwr"), "run", str(app_dir), connection, "--run-config", str(config_file)]
    command += ["--stream"] if stream else ["--format", "json"]
    return command


@dataclass(frozen=True)
class RunOutcome:
    run_id: int | None
    status: str  # Flower's: "finished:completed", "finished:failed", "finished:stopped", ...
    details: str


def run_status(flwr_home: Path, connection: str, run_id: int) -> tuple[str, str]:
    """(status, status details) of a run, from ``flwr ls --run-id``."""
    result = _json_tail(run_flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home=flwr_home))
    runs = result.get("runs", [])
    if not runs:
        return "unknown", f"run {run_id} is not known to the SuperLink"
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


_STARTED = re.compile(r"started run (\d+)")


def submit_run(
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, Any],
    *,
    timeout_s: float | None,
    on_line: Callable[[str], None] | None = None,
    app_dir: Path = PROJECT_ROOT,
) -> RunOutcome:
    """Submit a run (after checking the SuperLink answers over TLS), stream its log to ``on_line`` until it ends,
    and return Flower's verdict on it. ``timeout_s`` bounds the wait (the run is then stopped)."""
    conn = read_connection(flwr_home, connection)
    probe_superlink(conn.address, conn.ca_cert)
    run_id: int | None = None
    with tempfile.TemporaryDirectory(prefix="fedchurn-run-") as tmp:
        command = run_command(
            connection, run_config, config_file=Path(tmp) / "run-config.toml", stream=True, app_dir=app_dir
        )
        process = subprocess.Popen(
            command,
            cwd=app_dir,
            env=flower_environment(flwr_home),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        timer = threading.Timer(timeout_s, process.kill) if timeout_s else None
        if timer is not None:
            timer.start()
        try:
            output = process.stdout
            if output is not None:
                for line in output:
                    match = _STARTED.search(line)
                    if match and run_id is None:
                        run_id = int(match.group(1))
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
            returncode = process.wait()
        except KeyboardInterrupt:
            # Ctrl-C: stop the run at the SuperLink (the round under way is abandoned; the last completed one is
            # checkpointed). A second Ctrl-C exits at once, without a traceback.
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
            if run_id is not None:
                with contextlib.suppress(FederationError):
                    run_flwr(["stop", str(run_id), connection], flwr_home=flwr_home)
            return RunOutcome(run_id, "interrupted", "stopped on Ctrl-C; its last completed round is checkpointed")
        finally:
            if timer is not None:
                timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        timed_out = timer is not None and not timer.is_alive() and returncode < 0
    if run_id is None:
        return RunOutcome(None, "not-started", f"flwr run exited with code {returncode} before the run started")
    if timed_out:
        run_flwr(["stop", str(run_id), connection], flwr_home=flwr_home)
        return RunOutcome(run_id, "timed-out", f"no result within {timeout_s:g} s (--timeout); the run was stopped")
    status, details = run_status(flwr_home, connection, run_id)
    return RunOutcome(run_id, status, details)
