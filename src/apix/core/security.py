"""Random tokens, their hashes, and encryption of secrets at rest."""

from __future__ import annotations

import base64
import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["InvalidToken", "SecretBox", "new_token", "token_hash"]


def new_token(prefix: str, nbytes: int = 32) -> str:
    """A URL-safe random token such as ``apx_…``; 256 bits of entropy by default."""
    return f"{prefix}_{secrets.token_urlsafe(nbytes)}"


def token_hash(token: str) -> str:
    """SHA-256 of a high-entropy token: what is stored and looked up, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class SecretBox:
    """Authenticated encryption (Fernet) with a key derived from the node's secret key."""

    def __init__(self, secret_key: str, *, purpose: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=f"apix:{purpose}".encode()
        ).derive(secret_key.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        return self._fernet.decrypt(ciphertext.encode()).decode()
