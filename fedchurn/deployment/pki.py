"""Security material of a consortium: its CA, the SuperLink's TLS certificate, each institution's node key.

Built with the ``cryptography`` package (no openssl needed):

- the consortium CA (EC P-384, self-signed, ``ca.crt`` + ``ca.key``): the operator keeps ``ca.key``;
- the SuperLink's TLS certificate (EC P-384, signed by the CA; SANs for localhost, 127.0.0.1 and the hosts given);
- one node-authentication key pair per institution, in the format Flower 1.42 reads: an OpenSSH EC private key
  (``flower-supernode --auth-supernode-private-key``) and its OpenSSH public key (``flwr supernode register``).
  Flower accepts NIST curves only; we use P-384.

Private keys are written 0600 inside 0700 folders and never overwritten silently. Nothing here prints.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedchurn.shared.config import is_valid_institution_name
from fedchurn.shared.errors import FedChurnError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_PRIVATE_KEY = "node-auth.key"
NODE_PUBLIC_KEY = "node-auth.pub"
DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class PkiError(FedChurnError):
    """Security material that is missing, unreadable, or would be overwritten."""


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerTlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    institution: str
    private_key: Path
    public_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def private_dir(folder: Path) -> Path:
    """Create ``folder`` (and parents) and make it 0700: only the owner may list or enter it."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, PRIVATE_DIR_MODE)
    return folder


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Create a 0600 file atomically; the key never exists on disk with wider permissions."""
    if path.exists() and not overwrite:
        raise PkiError(f"{path} already exists: refusing to overwrite a key (pass --force to replace it)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    os.chmod(path, PRIVATE_FILE_MODE)


def _write_public(path: Path, data: bytes, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise PkiError(f"{path} already exists: refusing to overwrite it (pass --force to replace it)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} not found at {path}") from None
    except OSError as exc:
        raise PkiError(f"{what} at {path} cannot be read: {exc.strerror}") from None


def create_ca(
    folder: Path, *, name: str = "fedchurn consortium CA", days: int = 3650, overwrite: bool = False
) -> CaFiles:
    """A self-signed CA for the consortium. ``ca.key`` signs the SuperLink's certificate; keep it offline."""
    if days < 1:
        raise PkiError(f"--days = {days}: a certificate must be valid for at least one day")
    private_dir(folder)
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    files = CaFiles(cert=folder / CA_CERT, key=folder / CA_KEY)
    _write_private(files.key, _pem_key(key), overwrite=overwrite)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    return files


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # unique, in order
        if not host or any(ch.isspace() for ch in host):
            raise PkiError(f"host {host!r} is not a valid DNS name or IP address")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(_read(folder / CA_CERT, "the consortium CA certificate"))
    try:
        key = serialization.load_pem_private_key(_read(folder / CA_KEY, "the consortium CA key"), password=None)
    except ValueError as exc:
        raise PkiError(f"{folder / CA_KEY} is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{folder / CA_KEY} is not an EC private key")
    return cert, key


def create_server_cert(
    ca_folder: Path,
    out_folder: Path,
    *,
    hosts: tuple[str, ...] = (),
    days: int = 825,
    overwrite: bool = False,
) -> ServerTlsFiles:
    """The SuperLink's TLS certificate, signed by the CA, valid for localhost, 127.0.0.1 and ``hosts``.

    ``out_folder`` receives ``server.pem``, ``server.key`` (0600) and a copy of ``ca.crt`` — what
    ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` need.
    """
    if days < 1:
        raise PkiError(f"--days = {days}: a certificate must be valid for at least one day")
    ca_cert, ca_key = load_ca(ca_folder)
    private_dir(out_folder)
    all_hosts = (*DEFAULT_SERVER_HOSTS, *hosts)
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(all_hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = ServerTlsFiles(ca_cert=out_folder / CA_CERT, cert=out_folder / SERVER_CERT, key=out_folder / SERVER_KEY)
    _write_private(files.key, _pem_key(key), overwrite=overwrite)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    return files


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(_read(cert_path, "certificate"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def create_node_key(folder: Path, institution: str, *, overwrite: bool = False) -> NodeKeyFiles:
    """An institution's SuperNode authentication key pair (OpenSSH EC P-384), created in its own folder.

    The private key stays in ``folder`` (0600, folder 0700); only ``node-auth.pub`` goes to the operator.
    """
    if not is_valid_institution_name(institution):
        raise PkiError(f"institution name {institution!r} is not valid (letters, digits and - _ . only)")
    private_dir(folder)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files = NodeKeyFiles(
        institution=institution, private_key=folder / NODE_PRIVATE_KEY, public_key=folder / NODE_PUBLIC_KEY
    )
    _write_private(files.private_key, private, overwrite=overwrite)
    _write_public(files.public_key, public + f" fedchurn-{institution}\n".encode(), overwrite=overwrite)
    return files


def check_node_public_key(path: Path) -> None:
    """The file holds an OpenSSH EC public key on a NIST curve, as ``flwr supernode register`` requires."""
    try:
        key = serialization.load_ssh_public_key(_read(path, "node public key"))
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path} is not an EC public key (Flower's node authentication needs a NIST EC curve)")


def check_node_private_key(path: Path) -> None:
    """The private key exists, parses as an OpenSSH EC key and is readable by its owner only."""
    data = _read(path, "node private key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PkiError(f"{path} has permissions {oct(mode)}: a private key must be 0600 (chmod 600 {path})")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key (Flower's node authentication needs a NIST EC curve)")


def check_pem_certificate(path: Path, what: str) -> None:
    try:
        x509.load_pem_x509_certificate(_read(path, what))
    except ValueError as exc:
        raise PkiError(f"{what} at {path} is not a PEM certificate: {exc}") from None
