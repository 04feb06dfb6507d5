"""The command lines of the federation's long-running processes: the SuperLink and each institution's SuperNode.

Each builder checks its files, keys and port first, so a mistake fails here with a clear message, before a Flower
process starts. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedchurn.deployment.federation import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_RUNTIME_PORT,
    FederationError,
    check_port_free,
    executable,
    parse_address,
)
from fedchurn.deployment.pki import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    check_node_private_key,
    check_pem_certificate,
    private_dir,
)
from fedchurn.shared.config import is_valid_institution_name


@dataclass(frozen=True)
class SuperLinkSpec:
    tls_dir: Path  # server.pem, server.key, ca.crt (fedchurn pki server)
    database: Path  # SQLite file: runs and registered nodes survive a restart
    host: str = "127.0.0.1"
    port: int = DEFAULT_SUPERLINK_PORT
    log_file: Path | None = None


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """Check the SuperLink's files and port, and return its command line (TLS + node authentication, always)."""
    cert, key, ca = spec.tls_dir / SERVER_CERT, spec.tls_dir / SERVER_KEY, spec.tls_dir / CA_CERT
    check_pem_certificate(cert, "SuperLink TLS certificate")
    check_pem_certificate(ca, "consortium CA certificate")
    if not key.is_file():
        raise FederationError(f"SuperLink TLS key not found at {key} (create it with: fedchurn pki server)")
    if not spec.database.parent.is_dir():
        raise FederationError(f"the folder of --database {spec.database} does not exist")
    check_port_free(spec.host, spec.port, what="SuperLink")
    command = [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--database",
        str(spec.database),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--disable-runtime-dependency-installation",
    ]
    if spec.log_file is not None:
        command += ["--log-file", str(spec.log_file)]
    return command


# --- SuperNode ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuperNodeSpec:
    institution: str
    superlink: str  # host:port
    ca_cert: Path
    private_key: Path
    data_path: Path
    state_dir: Path
    runtime_port: int = DEFAULT_SUPERNODE_RUNTIME_PORT
    max_retries: int = 30  # reconnection attempts after a lost connection, then the SuperNode exits
    max_wait_s: float = 600.0  # and at most this long in all


def node_config_text(institution: str, data_path: Path, state_dir: Path) -> str:
    """The ``--node-config`` string ``clients/institution.resolve_institution`` reads."""
    for what, value in (("data path", str(data_path)), ("state folder", str(state_dir))):
        if "'" in value or '"' in value:
            raise FederationError(f"{what} {value!r} contains a quote, which --node-config cannot carry")
    return f"institution='{institution}' data-path='{data_path}' state-dir='{state_dir}'"


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """Check the institution's files, then return its SuperNode's command line."""
    if not is_valid_institution_name(spec.institution):
        raise FederationError(f"institution name {spec.institution!r} is not valid (letters, digits, - _ . only)")
    check_pem_certificate(spec.ca_cert, "consortium CA certificate")
    check_node_private_key(spec.private_key)
    if not spec.data_path.is_file():
        raise FederationError(f"data of {spec.institution} not found at {spec.data_path}")
    if spec.max_retries < 1 or spec.max_wait_s <= 0:
        raise FederationError("--max-retries and --max-wait must be positive: a SuperNode never retries forever")
    parse_address(spec.superlink)
    private_dir(spec.state_dir)  # the head and privacy accountant stay here, readable by the institution only
    check_port_free("127.0.0.1", spec.runtime_port, what=f"SuperNode of {spec.institution} (its --runtime-port)")
    return [
        executable("flower-supernode"),
        "--superlink",
        spec.superlink,
        "--root-certificates",
        str(spec.ca_cert),
        "--auth-supernode-private-key",
        str(spec.private_key),
        "--node-config",
        node_config_text(spec.institution, spec.data_path.resolve(), spec.state_dir.resolve()),
        "--port",
        str(spec.runtime_port),
        "--max-retries",
        str(spec.max_retries),
        "--max-wait-time",
        f"{spec.max_wait_s:g}",
    ]


# --- the flwr CLI: connections, registration, runs ----------------------------------------------------
