"""RS256 signing keys in a folder: the newest signs, every key present verifies.

`apix keys rotate` writes a new key; tokens signed by an older key stay valid until they
expire, because the older key stays in the folder until it can no longer have live tokens.
A node reloads the folder when it meets a `kid` it does not know, so rotation on one host
reaches the others that share the folder without a restart.

Processes that start together on an empty folder (`apix serve --workers N` in development)
make one first key between them: it is created under a lock on the folder, and a key file
appears whole (written aside, then renamed), never half-written to a reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwt.algorithms import RSAAlgorithm

# Reload the folder at most this often when unknown `kid`s arrive (they may be forgeries).
_RELOAD_INTERVAL_S = 5.0


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    created_at: float

    @functools.cached_property
    def public_key(self) -> rsa.RSAPublicKey:
        """Derived once: every token verification needs it."""
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}


class KeyRing:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._keys: dict[str, SigningKey] = {}
        self._loaded_at = 0.0

    def load(self, *, create_if_empty: bool) -> None:
        keys = {key.kid: key for key in _read_folder(self.folder)}
        if not keys and create_if_empty:
            with _locked(self.folder):  # another process may be making the first key
                keys = {key.kid: key for key in _read_folder(self.folder)}
                if not keys:
                    key = generate(self.folder)
                    keys = {key.kid: key}
        if not keys:
            raise RuntimeError(
                f"no signing keys in {self.folder}: run `apix keys rotate` to create one"
            )
        self._keys = keys
        self._loaded_at = time.monotonic()

    @property
    def current(self) -> SigningKey:
        return max(self._keys.values(), key=lambda k: (k.created_at, k.kid))

    def get(self, kid: str) -> SigningKey | None:
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._loaded_at > _RELOAD_INTERVAL_S:
            self.load(create_if_empty=False)
            key = self._keys.get(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in sorted(self._keys.values(), key=lambda k: k.kid)]}


def generate(folder: Path) -> SigningKey:
    """Create a new RSA-2048 key file (mode 0600); it becomes the signing key."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    kid = f"{stamp}-{secrets.token_hex(4)}"
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = folder / f"{kid}.pem"
    aside = folder / f".{kid}.pem.tmp"  # not a `*.pem`: readers skip it until it is whole
    descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    os.rename(aside, path)
    return SigningKey(kid, private_key, path.stat().st_mtime)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` across processes (`flock` on a file in it)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prune(folder: Path, *, keep_after: float) -> list[str]:
    """Delete keys superseded before ``keep_after`` (epoch s); their tokens have expired."""
    keys = sorted(_read_folder(folder), key=lambda k: (k.created_at, k.kid))
    removed = []
    for older, newer in itertools.pairwise(keys):
        if newer.created_at < keep_after:
            (folder / f"{older.kid}.pem").unlink(missing_ok=True)
            removed.append(older.kid)
    return removed


def _read_folder(folder: Path) -> list[SigningKey]:
    if not folder.is_dir():
        return []
    keys = []
    for path in sorted(folder.glob("*.pem")):
        private_key = _parse(path.read_bytes())
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise RuntimeError(f"{path} is not an RSA private key")
        keys.append(SigningKey(path.stem, private_key, path.stat().st_mtime))
    return keys


@functools.lru_cache(maxsize=32)
def _parse(pem: bytes) -> PrivateKeyTypes:
    """A key file's contents, parsed once per process: parsing checks the RSA key (tens of
    milliseconds), and a reload for an unknown `kid` reads the whole folder again."""
    return serialization.load_pem_private_key(pem, password=None)
