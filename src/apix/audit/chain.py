"""The audit hash chain: a row's canonical content, its hash, and checkpoint signatures.

The database computes each row's hash on insert (migration 0007's `apix_audit_hash`); this
module computes the same bytes independently, so `verify` does not trust the database's own
function, and an auditor can re-check an export with nothing but SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

FORMAT = "apix.audit.v1"
GENESIS_HASH = "0" * 64
CHECKPOINT_ACTION = "audit.checkpoint"

# The stored fields a row's hash covers, in order. `details` is PostgreSQL's rendering of
# the stored JSONB (`details::text`), deterministic for a given value; `hash` is left out.
HASHED_FIELDS = (
    "id",
    "org_id",
    "seq",
    "prev_hash",
    "created_at",
    "actor_user_id",
    "actor_api_key_id",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "source",
    "ip",
    "user_agent",
    "request_id",
    "details",
)


def format_timestamp(value: datetime) -> str:
    """UTC with microseconds (PostgreSQL's precision): `2026-11-27T17:41:22.588073Z`."""
    if value.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond:06d}Z"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, uuid.UUID | int):
        return str(value)
    raise TypeError(f"cannot hash a {type(value).__name__}")


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: the format tag, then each field length-prefixed.

    A field is ``<byte length>:<UTF-8 text>``, or ``~`` when NULL, so no two rows share an
    encoding whatever their text holds.
    """
    parts = [FORMAT]
    for name in HASHED_FIELDS:
        value = _text(fields[name])
        parts.append("~" if value is None else f"{len(value.encode())}:{value}")
    return "".join(parts).encode()


def row_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(fields)).hexdigest()


def checkpoint_signature(
    secret: bytes, *, org_id: uuid.UUID | None, through_seq: int, through_hash: str
) -> str:
    """HMAC-SHA256 over the last removed row's position and hash, bound to its chain."""
    chain = "platform" if org_id is None else str(org_id)
    message = f"{FORMAT}.checkpoint:{chain}:{through_seq}:{through_hash}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()
