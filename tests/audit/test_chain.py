"""The hash chain: every insert is linked, concurrent writers never fork it, and any change
to a stored row is found at that row."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.audit import chain
from apix.audit.verify import verify
from apix.core.json import dumps
from apix.identity.runtime import IdentityRuntime
from apix.infra.database import Database
from tests.audit.helpers import SECRET, chain_rows, delete_row, record_many, tamper

_PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Text PostgreSQL can store: anything but NUL (surrogates cannot be encoded either).
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
SHORT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63) + 1, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
EVENT = st.fixed_dictionaries(
    {
        "action": st.from_regex(r"\A[a-z]{1,12}\.[a-z_]{1,12}\Z"),
        "target_type": st.none() | st.text("abcdefgh", min_size=1, max_size=10),
        "target_id": st.none() | TEXT.filter(bool),
        "outcome": st.sampled_from(["success", "failure", "denied"]),
        "details": st.dictionaries(TEXT, JSON, max_size=4),
        "actor_user_id": st.none() | st.uuids(),
    }
)


@pytest.fixture
def database(runtime: IdentityRuntime) -> Database:
    return runtime.database


async def _verify(database: Database, org_id: uuid.UUID | None) -> dict[str, Any]:
    return await verify(database, org_id, SECRET)


# --- the format -------------------------------------------------------------------------


@_PROPERTY
@given(
    values=st.fixed_dictionaries(
        {
            "id": st.uuids(),
            "org_id": st.none() | st.uuids(),
            "seq": st.integers(1, 2**62),
            "prev_hash": st.text("0123456789abcdef", min_size=64, max_size=64),
            "actor_user_id": st.none() | st.uuids(),
            "actor_api_key_id": st.none() | st.uuids(),
            "action": TEXT.filter(bool),
            "target_type": st.none() | TEXT,
            "target_id": st.none() | TEXT,
            "outcome": SHORT.filter(bool),
            "source": SHORT.filter(bool),
            "ip": st.none() | TEXT,
            "user_agent": st.none() | TEXT,
            "request_id": st.none() | TEXT,
            "details": st.dictionaries(TEXT, JSON, max_size=5),
            "created_at": st.datetimes(
                min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - made aware by `timezones`
                max_value=datetime(2200, 1, 1),  # noqa: DTZ001
                timezones=st.just(UTC),
            ),
        }
    )
)
async def test_python_recomputes_the_hash_the_database_computes(
    owner_engine: AsyncEngine, values: dict[str, Any]
) -> None:
    document = dumps({**values, "created_at": values["created_at"].isoformat()}).decode()
    async with owner_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT apix_audit_hash(r) AS hash, (r).details::text AS details "
                    "FROM jsonb_populate_record(NULL::audit_log, CAST(:doc AS jsonb)) AS r"
                ),
                {"doc": document},
            )
        ).one()
    assert chain.row_hash({**values, "details": row.details}) == row.hash


def test_the_encoding_is_unambiguous() -> None:
    base: dict[str, Any] = dict.fromkeys(chain.HASHED_FIELDS)
    base.update(
        id=uuid.UUID(int=1),
        seq=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        prev_hash=chain.GENESIS_HASH,
        details="{}",
    )
    # Text moved from one field to its neighbour, or NULL against empty, changes the hash.
    a = chain.row_hash({**base, "action": "ab", "target_type": "c"})
    b = chain.row_hash({**base, "action": "a", "target_type": "bc"})
    c = chain.row_hash({**base, "action": "a", "target_type": None})
    d = chain.row_hash({**base, "action": "a", "target_type": ""})
    assert len({a, b, c, d}) == 4
    with pytest.raises(ValueError, match="timezone-aware"):
        chain.format_timestamp(datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test


# --- inserts ----------------------------------------------------------------------------


@_PROPERTY
@given(events=st.lists(EVENT, min_size=1, max_size=8), batches=st.integers(1, 3))
async def test_any_sequence_of_inserts_verifies(
    database: Database, owner_engine: AsyncEngine, events: list[dict[str, Any]], batches: int
) -> None:
    org = uuid.uuid4()
    for i in range(batches):
        await record_many(database, org, events[i::batches])
    report = await _verify(database, org)
    assert report["ok"], report
    assert report["checked"] == len(events)
    rows = await chain_rows(owner_engine, org)
    assert [r["seq"] for r in rows] == list(range(1, len(events) + 1))
    assert rows[0]["prev_hash"] == chain.GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    assert report["head_hash"] == rows[-1]["hash"]


async def test_the_platform_chain_is_a_chain_of_its_own(database: Database) -> None:
    org = uuid.uuid4()
    await record_many(database, None, [{"action": "platform.probe"}] * 2)
    await record_many(database, org, [{"action": "org.probe"}] * 3)
    platform, tenant = await _verify(database, None), await _verify(database, org)
    assert platform["ok"], platform
    assert tenant["ok"], tenant
    assert tenant["checked"] == 3
    assert platform["checked"] >= 2


async def test_an_insert_cannot_choose_its_place_hash_or_time(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await record_many(database, org, [{"action": "first"}])
    async with database.transaction(org) as uow:
        await uow.session.execute(
            text(
                "INSERT INTO audit_log (id, org_id, action, outcome, details, seq, prev_hash, "
                "hash, created_at) VALUES (gen_random_uuid(), :org, 'forged', 'success', '{}', "
                "99, :zero, :zero, '2001-01-01T00:00:00Z')"
            ),
            {"org": org, "zero": "f" * 64},
        )
    rows = await chain_rows(owner_engine, org)
    assert [r["seq"] for r in rows] == [1, 2]
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert rows[1]["created_at"] > rows[0]["created_at"]
    assert (await _verify(database, org))["ok"]


async def test_concurrent_writers_to_one_organisation_never_fork_the_chain(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()

    async def writer(n: int) -> None:
        async with database.transaction(org) as uow:
            for i in range(3):
                from apix.audit import service as audit
                from apix.audit.service import RequestMeta

                await audit.record(uow, f"w{n}.e{i}", meta=RequestMeta(), org_id=org)
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(12)))
    rows = await chain_rows(owner_engine, org)
    assert [r["seq"] for r in rows] == list(range(1, 37))
    # Each writer's events are contiguous: one transaction holds the chain until it commits.
    writers = [r["action"].split(".")[0] for r in rows]
    assert all(len(set(writers[i : i + 3])) == 1 for i in range(0, 36, 3))
    assert (await _verify(database, org))["ok"]


# --- tampering --------------------------------------------------------------------------

_DIFFERENT: dict[str, Any] = {
    "id": lambda row: uuid.uuid4(),
    "actor_user_id": lambda row: uuid.uuid4(),
    "actor_api_key_id": lambda row: uuid.uuid4(),
    "action": lambda row: row["action"] + "x",
    "target_type": lambda row: (row["target_type"] or "") + "x",
    "target_id": lambda row: (row["target_id"] or "") + "x",
    "outcome": lambda row: "success" if row["outcome"] != "success" else "failure",
    "source": lambda row: "integration",
    "ip": lambda row: "198.51.100.1",
    "user_agent": lambda row: (row["user_agent"] or "") + "x",
    "request_id": lambda row: (row["request_id"] or "") + "x",
    "details": lambda row: '{"tampered by the owner": [1, 2, 3]}',
    "created_at": lambda row: row["created_at"].replace(microsecond=0),
    "prev_hash": lambda row: "0" * 63 + "1",
    "hash": lambda row: "f" * 64,
}


@_PROPERTY
@given(
    events=st.lists(EVENT, min_size=1, max_size=6),
    index=st.integers(0, 5),
    column=st.sampled_from(sorted(_DIFFERENT)),
)
async def test_changing_any_one_field_of_a_row_is_found_at_that_row(
    database: Database,
    owner_engine: AsyncEngine,
    events: list[dict[str, Any]],
    index: int,
    column: str,
) -> None:
    org = uuid.uuid4()
    await record_many(database, org, events)
    rows = await chain_rows(owner_engine, org)
    target = rows[index % len(rows)]
    if column == "created_at" and target["created_at"].microsecond == 0:
        return  # the stand-in value would be the same time
    await tamper(owner_engine, org, target["id"], column, _DIFFERENT[column](target))
    report = await _verify(database, org)
    assert not report["ok"]
    broken = report["broken"]
    assert broken["seq"] == target["seq"], (column, broken)
    expected_id = target["id"] if column != "id" else broken["id"]
    assert broken["id"] == expected_id


async def test_a_removed_row_is_found_at_the_row_after_it(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await record_many(database, org, [{"action": f"e.{i}"} for i in range(5)])
    rows = await chain_rows(owner_engine, org)
    await delete_row(owner_engine, org, rows[2]["id"])
    report = await _verify(database, org)
    assert report["broken"]["seq"] == 4
    assert report["broken"]["id"] == rows[3]["id"]
    assert "follows seq 2" in report["broken"]["reason"]


async def test_a_removed_first_row_is_found_at_the_new_first_row(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await record_many(database, org, [{"action": f"e.{i}"} for i in range(3)])
    rows = await chain_rows(owner_engine, org)
    await delete_row(owner_engine, org, rows[0]["id"])
    report = await _verify(database, org)
    assert report["broken"]["seq"] == 2
    assert "no checkpoint" in report["broken"]["reason"]


async def test_a_row_moved_within_the_chain_is_found(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await record_many(database, org, [{"action": f"e.{i}"} for i in range(4)])
    rows = await chain_rows(owner_engine, org)
    await tamper(owner_engine, org, rows[1]["id"], "seq", 100)
    report = await _verify(database, org)
    assert not report["ok"]
    assert report["broken"]["seq"] == 3  # the gap shows where the row was taken from
