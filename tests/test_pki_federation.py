"""Security material and the pre-flight checks of the federation commands (no Flower process started)."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedchurn.cli.main import main
from fedchurn.deployment.federation import (
    FederationError,
    free_port,
    parse_address,
    probe_superlink,
    read_connection,
    write_connection,
)
from fedchurn.deployment.flower_processes import SuperLinkSpec, SuperNodeSpec, superlink_command, supernode_command
from fedchurn.deployment.pki import PkiError, certificate_hosts, create_ca, create_node_key, create_server_cert
from fedchurn.shared.config import apply_overrides, default_config
from fedchurn.shared.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    create_server_cert(root / "ca", root / "superlink", hosts=("superlink.bank.example", "10.1.2.3"))
    create_node_key(root / "bank-01" / "keys", "bank-01")
    return root


def test_keys_are_private_and_certificates_chain_to_the_ca(pki: Path) -> None:
    for key in (pki / "ca" / "ca.key", pki / "superlink" / "server.key", pki / "bank-01" / "keys" / "node-auth.key"):
        assert _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "superlink" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(certificate_hosts(pki / "superlink" / "server.pem")) == {
        "localhost",
        "127.0.0.1",
        "superlink.bank.example",
        "10.1.2.3",
    }


def test_node_key_is_what_flower_reads(pki: Path) -> None:
    """flower-supernode loads an OpenSSH EC private key; `flwr supernode register` an OpenSSH NIST EC public key."""
    from flwr.cli.supernode.register import try_load_public_key

    folder = pki / "bank-01" / "keys"
    private = serialization.load_ssh_private_key((folder / "node-auth.key").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(folder / "node-auth.pub")  # Flower's own loader accepts it


def test_keys_are_never_overwritten_silently(pki: Path) -> None:
    with pytest.raises(PkiError, match="refusing to overwrite"):
        create_node_key(pki / "bank-01" / "keys", "bank-01")
    with pytest.raises(PkiError, match="not valid"):
        create_node_key(pki / "x", "../evil")


def test_commands_fail_clearly_on_wrong_paths_keys_and_addresses(pki: Path, tmp_path: Path) -> None:
    data = tmp_path / "customers.csv"
    data.write_text("a\n1\n")
    spec = SuperNodeSpec(
        institution="bank-01",
        superlink=f"127.0.0.1:{free_port()}",
        ca_cert=pki / "superlink" / "ca.crt",
        private_key=pki / "bank-01" / "keys" / "node-auth.key",
        data_path=data,
        state_dir=tmp_path / "state",
        runtime_port=free_port(),
    )
    command = supernode_command(spec)
    assert "--auth-supernode-private-key" in command and "--max-retries" in command
    assert _mode(tmp_path / "state") == 0o700
    with pytest.raises(PkiError, match="node private key not found"):
        supernode_command(SuperNodeSpec(**{**spec.__dict__, "private_key": tmp_path / "missing.key"}))
    with pytest.raises(FederationError, match="data of bank-01 not found"):
        supernode_command(SuperNodeSpec(**{**spec.__dict__, "data_path": tmp_path / "nope.csv"}))
    with pytest.raises(PkiError, match="consortium CA certificate not found"):
        supernode_command(SuperNodeSpec(**{**spec.__dict__, "ca_cert": tmp_path / "ca.crt"}))
    loose = tmp_path / "loose.key"
    loose.write_bytes((pki / "bank-01" / "keys" / "node-auth.key").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(PkiError, match="must be 0600"):
        supernode_command(SuperNodeSpec(**{**spec.__dict__, "private_key": loose}))
    with pytest.raises(PkiError, match="not an OpenSSH private key"):
        supernode_command(SuperNodeSpec(**{**spec.__dict__, "private_key": pki / "superlink" / "server.key"}))
    with pytest.raises(FederationError, match="HOST:PORT"):
        parse_address("localhost")
    with pytest.raises(FederationError, match="cannot reach the SuperLink"):
        probe_superlink(spec.superlink, spec.ca_cert, timeout_s=2.0)
    with pytest.raises(PkiError, match="SuperLink TLS certificate not found"):
        superlink_command(SuperLinkSpec(tls_dir=tmp_path, database=tmp_path / "s.db"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FederationError, match="cannot listen"):
            superlink_command(SuperLinkSpec(tls_dir=pki / "superlink", database=tmp_path / "s.db", port=port))


def test_tls_probe_rejects_a_server_the_ca_did_not_sign(pki: Path, tmp_path: Path) -> None:
    """A server certificate from another CA is refused with a message that says so."""
    import ssl
    import threading

    create_ca(tmp_path / "other-ca")
    create_server_cert(tmp_path / "other-ca", tmp_path / "other")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "other" / "server.pem", tmp_path / "other" / "server.key")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(FederationError, match="fails verification"):
            probe_superlink(f"127.0.0.1:{port}", pki / "superlink" / "ca.crt", timeout_s=5.0)
        thread.join(timeout=5)


def test_connection_file_round_trip_and_cli_errors(pki: Path, tmp_path: Path, capsys) -> None:
    home = tmp_path / "flwr"
    write_connection(home, "consortium", address="127.0.0.1:9093", ca_cert=pki / "superlink" / "ca.crt")
    conn = read_connection(home, "consortium")
    assert conn.address == "127.0.0.1:9093" and conn.ca_cert == (pki / "superlink" / "ca.crt").resolve()
    with pytest.raises(FederationError, match="not in"):
        read_connection(home, "other")
    port = free_port()
    code = main(
        [
            "federation",
            "connect",
            "x",
            "--address",
            f"127.0.0.1:{port}",
            "--ca",
            str(pki / "superlink/ca.crt"),
            "--flwr-home",
            str(home),
        ]
    )
    assert code == 2 and "cannot reach the SuperLink" in capsys.readouterr().err
    code = main(
        [
            "supernode",
            "--institution",
            "bank-01",
            "--superlink",
            f"127.0.0.1:{port}",
            "--ca",
            str(pki / "superlink/ca.crt"),
            "--key",
            str(tmp_path / "nokey"),
            "--data",
            "x.csv",
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    assert code == 2 and "node private key not found" in capsys.readouterr().err


def test_supernode_policy_and_ledger_key_reach_the_banks_node_config(pki: Path, tmp_path: Path) -> None:
    """--policy / --ledger-key -> node config keys 'policy' / 'ledger-key', read back as Flower's SuperNode does."""
    from flwr.common.config import parse_config_args

    from fedchurn.cli.main import _build_parser
    from fedchurn.cli.supernode_cmd import command_for
    from fedchurn.clients.budget import bank_signer
    from fedchurn.clients.institution import resolve_institution
    from fedchurn.shared.ledger_signing import SigningError

    data = tmp_path / "customers.csv"
    data.write_text("a\n1\n")
    state = tmp_path / "state"
    policy = tmp_path / "bank policy.yaml"  # a space: the value must stay quoted in --node-config
    policy.write_text("min_noise_multiplier: 1.5\nlifetime_epsilon: 3.0\nmax_rounds_per_run: 12\n")
    node_key = pki / "bank-01" / "keys" / "node-auth.key"
    base = [
        "supernode",
        "--institution",
        "bank-01",
        "--superlink",
        f"127.0.0.1:{free_port()}",
        "--ca",
        str(pki / "superlink" / "ca.crt"),
        "--key",
        str(node_key),
        "--data",
        str(data),
        "--state-dir",
        str(state),
        "--runtime-port",
        str(free_port()),
    ]

    def node_config(*extra: str) -> dict[str, object]:
        _, command = command_for(_build_parser().parse_args([*base, *extra]))
        return parse_config_args([command[command.index("--node-config") + 1]])

    plain = {"institution": "bank-01", "data-path": str(data.resolve()), "state-dir": str(state.resolve())}
    assert node_config() == plain  # no flags: no keys (the bank then uses the conservative built-in policy)
    config = node_config("--policy", str(policy), "--ledger-key", str(node_key))
    assert config == {**plain, "policy": str(policy.resolve()), "ledger-key": str(node_key.resolve())}

    bank = resolve_institution(config, default_config())
    assert (bank.policy.min_noise_multiplier, bank.policy.lifetime_epsilon, bank.policy.max_rounds_per_run) == (
        1.5,
        3.0,
        12,
    )
    assert bank.policy.require_dp  # a key the file leaves out keeps its conservative value
    # The ledger is signed with the node's own key: the public key the consortium registered for this bank.
    node_public = serialization.load_ssh_private_key(node_key.read_bytes(), password=None).public_key()
    pem = node_public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert bank_signer(bank).public_key == pem.decode("ascii")

    # Bad files stop the bank before it joins, naming what is wrong.
    typo = tmp_path / "typo.yaml"
    typo.write_text("max_epsilon: 1.0\n")
    with pytest.raises(ConfigError, match="policy.max_epsilon"):
        node_config("--policy", str(typo))
    with pytest.raises(ConfigError, match="cannot be read"):
        node_config("--policy", str(tmp_path / "missing.yaml"))
    loose = tmp_path / "loose.key"
    loose.write_bytes(node_key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(FederationError, match="must be 0600"):
        node_config("--ledger-key", str(loose))
    not_a_key = tmp_path / "ca-copy.key"
    not_a_key.write_bytes((pki / "superlink" / "ca.crt").read_bytes())
    not_a_key.chmod(0o600)
    with pytest.raises(SigningError, match="not an unencrypted PEM or OpenSSH private key"):
        node_config("--ledger-key", str(not_a_key))
    with pytest.raises(FederationError, match="ledger signing key not found"):
        node_config("--ledger-key", str(tmp_path / "none.key"))
    quoted = tmp_path / "bank's policy.yaml"  # a quote would end the value early and let the rest pose as keys
    quoted.write_text("require_dp: true\n")
    with pytest.raises(FederationError, match="quote"):
        node_config("--policy", str(quoted))


def test_the_deploy_guides_bank_policy_example_loads_and_its_command_parses(tmp_path: Path) -> None:
    import re
    import shlex

    from fedchurn.cli.main import _build_parser
    from fedchurn.shared.policy import load_policy

    guide = (DEPLOY / "README.md").read_text()
    example = next(block for block in re.findall(r"```yaml\n(.*?)```", guide, re.S) if "require_dp" in block)
    policy_file = tmp_path / "privacy-policy.yaml"
    policy_file.write_text(example)
    policy = load_policy(policy_file)
    assert (policy.require_dp, policy.min_noise_multiplier, policy.max_clipping_norm) == (True, 1.0, 5.0)
    assert (policy.max_delta, policy.lifetime_epsilon, policy.max_rounds_per_run) == (1.0e-5, 6.0, 50)
    assert policy.allowed_transfer_modes == ("finetune", "frozen", "fedrep") and not policy.report_dataset_size
    command = next(block for block in re.findall(r"```text\n(.*?)```", guide, re.S) if "--ledger-key" in block)
    args = _build_parser().parse_args(shlex.split(command.replace("\\\n", " "))[1:])
    assert (args.policy, args.ledger_key) == ("banks/bank-01/privacy-policy.yaml", "banks/bank-01/keys/node-auth.key")


def test_resume_needs_a_run_name() -> None:
    with pytest.raises(ConfigError, match="federation.resume"):
        apply_overrides(default_config(), {"federation.resume": True})
    config = apply_overrides(default_config(), {"federation.run_name": "q1-2025"})
    assert config.federation.identity(7) == "q1-2025"
    assert default_config().federation.identity(7) == 7


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY) for p in DEPLOY.rglob("*.yaml")), ids=str)
def test_deploy_manifests_are_valid_yaml(path: Path) -> None:
    """Docker and Kubernetes cannot run here; at least every manifest parses and names what it must."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d is not None]
    assert docs
    for doc in docs:
        if "kind" in doc:
            assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), path
    if path.name == "compose.yaml":
        services = docs[0]["services"]
        assert {"superlink", "bank-01", "bank-02", "bank-03"} <= set(services)
        # Each runs as the owner of ./demo and writes only into bind-mounted folders of ./demo that user owns
        # (a named volume would belong to the image's user); Flower's config folder is among them.
        assert "volumes" not in docs[0]
        for name, service in services.items():
            assert service["user"].startswith("${FEDCHURN_UID"), name
            assert service["environment"]["FLWR_HOME"].startswith("/state/"), name
            assert all(mount.startswith("./demo/") for mount in service["volumes"]), name
    if path.name == "raycluster.yaml":
        head = docs[0]["spec"]["headGroupSpec"]
        assert head["rayStartParams"]["include-dashboard"] == "false"
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        ports = [p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])]
        assert 8265 not in ports
    if path.parts[0] == "k8s" and "supernode" in path.name:
        kinds = [d["kind"] for d in docs]
        assert kinds.count("Deployment") == 1 and kinds.count("PersistentVolumeClaim") == 2
