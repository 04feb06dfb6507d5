"""The bank's secret randomness: seeds for DP noise and Poisson batches, and the bank's secret key.

Every DP noise draw and every Poisson batch a bank makes comes from torch generators seeded with 64 bits drawn
from the operating system's CSPRNG (``secrets``) at that moment — never from ``config.seed``, the institution's
name, the round number or anything in a message, all of which the server knows. A retried or repeated round draws
fresh seeds, so fresh noise. (torch's generators accept at most a 64-bit seed; 64 fresh secret bits per call is
what a server would have to guess to regenerate the noise. The generators themselves — Mersenne Twister on the
CPU, Philox on a GPU — are not cryptographic; what the server sees is noise added to clipped gradient sums,
averaged over many steps, never the raw generator output.)

``privacy.reproducible_noise: true`` (simulation only, off by default) replaces the secret seeds by seeds derived
from the config's seed, the institution and the round: bit-identical reruns for research, and NOT private against
the server, who can regenerate every noise tensor. A bank running a real SuperNode refuses it.

The bank's secret key (32 random bytes, ``bank_secret.key`` in its state folder, mode 0600) keys the row split:
HMAC-SHA256(key, row) decides each row's part, so the server can neither know nor steer which rows train.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from fedchurn.shared.errors import FedChurnError

logger = logging.getLogger(__name__)

__all__ = [
    "BANK_KEY_FILE",
    "SeedSource",
    "bank_secret_key",
    "derive_seed",
    "derive_seed64",
    "reproducible_key",
    "row_coin",
    "secret_seed",
]

BANK_KEY_FILE = "bank_secret.key"
KEY_BYTES = 32
SEED_BITS = 64  # the most a torch.Generator takes


def secret_seed() -> int:
    """64 fresh bits from the OS CSPRNG, as a torch generator seed."""
    return secrets.randbits(SEED_BITS)


def seed_digest(*parts: int | str) -> bytes:
    """SHA-256 of ints and strings, the same on every machine and Python run: the root of every derived seed.

    A type tag keeps 1 and "1" apart; the separator keeps ("ab", "c") and ("a", "bc") apart.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"seeds derive from ints and strings, got {type(part).__name__}")
        digest.update(f"{'i' if isinstance(part, int) else 's'}:{part}\x1f".encode())
    return digest.digest()


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from ints and strings (sha256: the same on every machine and Python run)."""
    return int.from_bytes(seed_digest(*parts)[:4], "big") & 0x7FFFFFFF


def derive_seed64(*parts: int | str) -> int:
    """A stable 64-bit seed from ints and strings: for ``reproducible_noise`` and sub-seeds only."""
    return int.from_bytes(seed_digest(*parts)[:8], "big")


class SeedSource:
    """Where one train call's seeds come from: the OS CSPRNG (default), or a derivation (research switch)."""

    def __init__(self, *, reproducible_from: tuple[int | str, ...] | None = None) -> None:
        self._base = reproducible_from
        self._count = 0

    @property
    def secret(self) -> bool:
        return self._base is None

    def next_seed(self) -> int:
        """A fresh seed: 64 secret bits, or (reproducible) the next derived one."""
        self._count += 1
        if self._base is None:
            return secret_seed()
        return derive_seed64(*self._base, "draw", self._count)


def reproducible_key(seed: int, institution: str) -> bytes:
    """The split key under ``reproducible_noise``: derived from public values, so NOT secret."""
    return hashlib.sha256(f"fedchurn-reproducible-split\x1f{seed}\x1f{institution}".encode()).digest()


def bank_secret_key(folder: Path) -> tuple[bytes, bool]:
    """The bank's secret key in ``folder`` and whether this call created it (32 CSPRNG bytes, file mode 0600)."""
    path = folder / BANK_KEY_FILE
    folder.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path), False
    except OSError as exc:
        raise FedChurnError(
            f"cannot create the bank's secret key in its state folder: {exc.strerror}; make the folder writable"
        ) from None
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    logger.info("created the bank's secret key %s (mode 0600)", path)
    return key, True


def renew_bank_secret_key(folder: Path) -> bytes:
    """Replace the key just created (never one already used for training): 32 new CSPRNG bytes, mode 0600."""
    path = folder / BANK_KEY_FILE
    tmp = path.with_name(path.name + ".new")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return key


def _read_key(path: Path) -> bytes:
    # Another worker may be writing it this instant (O_EXCL let exactly one create it): wait for all 32 bytes.
    for _ in range(200):
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
        if len(key) > KEY_BYTES:
            break
        time.sleep(0.01)
    raise FedChurnError(
        f"the bank's secret key {path} is damaged (not {KEY_BYTES} bytes): restore it from backup; a new key "
        "re-splits every row"
    )


def row_coin(key: bytes, row: bytes) -> float:
    """HMAC-SHA256(key, row) as a number uniform in [0, 1) (53 bits), independent per distinct row."""
    digest = hmac.new(key, row, hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)
