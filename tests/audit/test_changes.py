"""`audit.changes`: the before/after diff an update records, with secrets redacted."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

from apix.audit.service import REDACTED, changes


class Tier(enum.StrEnum):
    FREE = "FREE"
    PRO = "PRO"


def test_only_changed_fields_appear() -> None:
    before = {"name": "a", "tier": Tier.FREE, "same": 1, "gone": True}
    after = {"name": "b", "tier": Tier.PRO, "same": 1, "new": [1, 2]}
    assert changes(before, after) == {
        "gone": {"from": True, "to": None},
        "name": {"from": "a", "to": "b"},
        "new": {"from": None, "to": [1, 2]},
        "tier": {"from": "FREE", "to": "PRO"},
    }
    assert changes(before, before) == {}


def test_secret_values_never_appear() -> None:
    before = {
        "password_hash": "argon2…",
        "api_key": None,
        "settings": {"webhook": {"secret": "s1"}},
    }
    after = {
        "password_hash": "argon2…new",
        "api_key": "apx_live_123",
        "settings": {"webhook": {"secret": "s2", "url": "https://x"}},
        "MFA_Secret": "JBSW",
    }
    diff = changes(before, after)
    assert diff["password_hash"] == {"from": REDACTED, "to": REDACTED}
    assert diff["api_key"] == {"from": None, "to": REDACTED}
    assert diff["MFA_Secret"] == {"from": None, "to": REDACTED}
    assert diff["settings"]["to"] == {"webhook": {"secret": REDACTED, "url": "https://x"}}
    assert "s1" not in str(diff)
    assert "s2" not in str(diff)
    assert "apx_live_123" not in str(diff)


def test_values_are_ready_for_json() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    diff = changes({"at": None, "ids": {ident}}, {"at": at, "ids": set()})
    assert diff == {
        "at": {"from": None, "to": "2026-01-02T03:04:05+00:00"},
        "ids": {"from": [str(ident)], "to": []},
    }
