"""Signatures on privacy-ledger records, so that no single party can rewrite them.

A hash chain alone is only tamper-evident against someone who cannot recompute it: the owner of a ledger can edit
a record and re-chain every hash after it. So each record is anchored with keys held by two different parties:

- the **bank** signs the hash of every record it appends to its own ledger, with a key it holds (a real SuperNode:
  its node-authentication key, EC P-384; a simulated bank: a key generated once in its state folder, 0600);
- the **server** countersigns the bank's record hash when it receives it, keeps the bank's signature in the
  consortium ledger, and sends its countersignature back; the bank stores it beside the record.

A bank that rewrites its own ledger can re-sign its records but cannot forge the server's countersignatures over
the new hashes; a server that rewrites the consortium ledger cannot forge the banks' signatures. ``fedchurn audit``
verifies both.

Wire contract (Flower messages):

- a train reply MAY carry a ConfigRecord under :data:`WIRE_KEY` (``ledger``) with text fields ``record-hash``
  (64 hex), ``signature`` (base64 DER ECDSA) and ``public-key`` (PEM SubjectPublicKeyInfo), each bounded;
- the next train message to that bank carries, in its round config, :data:`COUNTERSIGNATURE_FIELD`
  (``ledger-countersignature``): canonical JSON text ``{"record-hash", "signature", "public-key"}`` signed by the
  consortium key.

Every signature covers a domain-separated message (``fedchurn-ledger/1``, the signer's role, the record hash), so a
bank's signature can never pass as a countersignature or the other way round. Parsing and verification never raise
on hostile input: they return a reason (a fixed text, never echoing the input).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.ledger import SignedHash

logger = logging.getLogger(__name__)

__all__ = [
    "BANK_KEY_FILE",
    "CONSORTIUM_KEY_FILE",
    "COUNTERSIGNATURE_FIELD",
    "MAX_PUBLIC_KEY_CHARS",
    "MAX_SIGNATURE_CHARS",
    "WIRE_KEY",
    "LedgerSigner",
    "SignedHash",
    "fingerprint",
    "load_or_create_signer",
    "load_signer",
    "parse_countersignature",
    "parse_wire",
    "verify",
]

Role = Literal["bank", "consortium"]

WIRE_KEY = "ledger"  # the ConfigRecord of a train reply
COUNTERSIGNATURE_FIELD = "ledger-countersignature"  # a field of the next round's train config
BANK_KEY_FILE = "ledger-signing-key.pem"  # a simulated bank's key, in its state folder
CONSORTIUM_KEY_FILE = "consortium-signing-key.pem"  # the server's key, in its output folder
MAX_PUBLIC_KEY_CHARS = 1024  # a P-384 SubjectPublicKeyInfo PEM is ~215 characters
MAX_SIGNATURE_CHARS = 256  # a P-384 DER ECDSA signature is <= 104 bytes, 140 in base64
_HASH = re.compile(r"[0-9a-f]{64}")
_DOMAIN = b"fedchurn-ledger/1"


class SigningError(FedChurnError):
    """A signing key that cannot be read or created."""


def _message(role: Role, record_hash: str) -> bytes:
    return b"\n".join((_DOMAIN, role.encode(), record_hash.encode()))


class LedgerSigner:
    """An EC P-384 private key that signs ledger record hashes in one role."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, role: Role) -> None:
        if not isinstance(key.curve, ec.SECP384R1):
            raise SigningError(f"a ledger signing key must be EC P-384, not {key.curve.name}")
        self._key = key
        self.role: Role = role
        self.public_key = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def sign(self, record_hash: str) -> SignedHash:
        if not _HASH.fullmatch(record_hash):
            raise SigningError("a record hash is 64 lowercase hex characters")
        der = self._key.sign(_message(self.role, record_hash), ec.ECDSA(hashes.SHA384()))
        return SignedHash(record_hash, base64.b64encode(der).decode("ascii"), self.public_key)


def load_signer(path: Path, role: Role) -> LedgerSigner:
    """A signer from an existing private key: PEM (PKCS#8 / SEC1) or OpenSSH (a SuperNode's node key)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the ledger signing key {path}: {exc.strerror}") from None
    try:
        key: Any = (
            serialization.load_ssh_private_key(data, password=None)
            if data.lstrip().startswith(b"-----BEGIN OPENSSH")
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError):
        raise SigningError(f"{path} is not an unencrypted PEM or OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError(f"{path} is not an EC private key (ledger signatures use EC P-384)")
    return LedgerSigner(key, role)


def load_or_create_signer(path: Path, role: Role) -> LedgerSigner:
    """The key at ``path``, created once (0600, exclusively: two workers cannot both create it)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_signer(path, role)  # another process created it first: use that one
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        logger.info("created the %s ledger signing key %s (fingerprint %s)", role, path, fingerprint_of_key(key))
    return load_signer(path, role)


def fingerprint_of_key(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def fingerprint(public_key_pem: str) -> str | None:
    """SHA-256 of the DER public key (what a party publishes to pin its key); None if it is not a key."""
    key = _public_key(public_key_pem)
    if key is None:
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _public_key(pem: str) -> ec.EllipticCurvePublicKey | None:
    if not isinstance(pem, str) or len(pem) > MAX_PUBLIC_KEY_CHARS:
        return None
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return None
    return key


def verify(signed: SignedHash, role: Role) -> bool:
    """Whether ``signed.signature`` is ``signed.public_key``'s signature of the hash in ``role``. Never raises."""
    key = _public_key(signed.public_key)
    if key is None or not _HASH.fullmatch(signed.record_hash) or len(signed.signature) > MAX_SIGNATURE_CHARS:
        return False
    try:
        der = base64.b64decode(signed.signature, validate=True)
        key.verify(der, _message(role, signed.record_hash), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _signed_from(fields: Mapping[str, Any]) -> SignedHash | str:
    values = {}
    for name, limit in (("record-hash", 64), ("signature", MAX_SIGNATURE_CHARS), ("public-key", MAX_PUBLIC_KEY_CHARS)):
        value = fields.get(name)
        if not isinstance(value, str) or not value or len(value) > limit:
            return f"field '{name}' is missing, not text, or longer than {limit} characters"
        values[name] = value
    if set(fields) - {"record-hash", "signature", "public-key"}:
        return "unexpected fields besides record-hash, signature and public-key"
    return SignedHash(values["record-hash"], values["signature"], values["public-key"])


def parse_wire(fields: Mapping[str, Any], role: Role) -> SignedHash | str:
    """A reply's ``ledger`` record as a verified :class:`SignedHash`, or a fixed-text reason it is refused."""
    signed = _signed_from(fields)
    if isinstance(signed, str):
        return signed
    if not verify(signed, role):
        return "the signature does not verify against the public key and record hash"
    return signed


def parse_countersignature(text: Any) -> SignedHash | str:
    """The round config's ``ledger-countersignature`` as a verified :class:`SignedHash`, or a reason."""
    if not isinstance(text, str) or len(text) > 2 * MAX_PUBLIC_KEY_CHARS:
        return "not text of a bounded length"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        return "not JSON"
    if not isinstance(fields, dict):
        return "not a JSON object"
    return parse_wire(fields, "consortium")
