"""Commands are packed by hiredis, byte for byte as redis-py's own packer would."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from apix.config import RedisSettings
from apix.infra.redis import create_redis

_ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)


@given(name=st.sampled_from(["SET", "EVALSHA", "XADD", "ZADD"]), args=st.lists(_ARG, max_size=20))
def test_hiredis_packs_what_redis_py_packs(name: str, args: list[object]) -> None:
    client = create_redis("redis://127.0.0.1:1/0", RedisSettings())
    packing = client.connection_pool.connection_class(host="127.0.0.1", port=1)
    plain = Connection(host="127.0.0.1", port=1)
    assert type(packing) is not Connection
    assert b"".join(packing.pack_command(name, *args)) == b"".join(plain.pack_command(name, *args))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.one_of(st.text(), st.binary()))
async def test_values_round_trip_through_redis(redis: Redis, value: str | bytes) -> None:
    await redis.set("apix:test:packing", value)
    stored = await redis.get("apix:test:packing")
    assert stored == (value.encode() if isinstance(value, str) else value)


async def test_multi_word_commands_and_bad_types_behave_as_in_redis_py(redis: Redis) -> None:
    assert "maxmemory" in await redis.execute_command("CONFIG GET", "maxmemory")
    with pytest.raises(DataError):
        await redis.set("apix:test:packing", None)  # type: ignore[arg-type]
