"""The auto-pipeline: concurrent commands share round trips, each gets its own outcome."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apix.config import RedisSettings
from apix.infra.redis import AutoPipeline, create_redis
from tests.conftest import Servers


class CountingPipelines(AutoPipeline):
    """Counts the round trips it makes."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.round_trips = 0

    def _write(self, line: Any, batch: list) -> None:  # type: ignore[type-arg]
        self.round_trips += 1
        super()._write(line, batch)


@pytest.fixture
async def impatient(servers: Servers) -> AsyncIterator[Redis]:
    """A client whose commands have 0.3 s for their replies."""
    client = create_redis(servers.redis_url, RedisSettings(socket_timeout_s=0.3))
    yield client
    await client.aclose()


async def test_concurrent_commands_share_round_trips(redis: Redis) -> None:
    batch = CountingPipelines(redis)
    await redis.delete("t:batch")
    results = await asyncio.gather(*(batch.call("INCR", "t:batch") for _ in range(200)))
    # Every command ran once, in order, and they went out together.
    assert sorted(results) == list(range(1, 201))
    assert results == list(range(1, 201))
    assert batch.round_trips == 1
    assert int(await redis.get("t:batch")) == 200


async def test_a_failing_command_fails_alone(redis: Redis) -> None:
    batch = AutoPipeline(redis)
    await redis.set("t:string", "x")
    ok = batch.call("SET", "t:other", "y")
    wrong = batch.call("INCR", "t:string")  # not an integer
    after = batch.call("GET", "t:other")
    assert await ok == b"OK"  # raw replies: no redis-py response callbacks
    with pytest.raises(ResponseError):
        await wrong
    assert await after == b"y"


async def test_a_forgotten_script_is_loaded_again(redis: Redis) -> None:
    batch = AutoPipeline(redis)
    script = redis.register_script("return tonumber(ARGV[1]) + 1")
    assert await batch.script(script, [], [41]) == 42
    await redis.script_flush()  # as after a restart without persistence
    assert await batch.script(script, [], [1]) == 2


async def test_a_script_nobody_waits_for_still_runs_after_a_flush(redis: Redis) -> None:
    batch = AutoPipeline(redis)
    script = redis.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    await redis.script_flush()
    batch.send_script(script, ["t:sent"], ["ran"])
    for _ in range(100):
        if await redis.get("t:sent") == b"ran":
            break
        await asyncio.sleep(0.02)
    assert await redis.get("t:sent") == b"ran"


async def test_commands_after_a_batch_go_in_the_next(redis: Redis) -> None:
    batch = CountingPipelines(redis)
    first = await batch.call("PING")
    second = await batch.call("PING")
    assert (first, second) == (b"PONG", b"PONG")
    assert batch.round_trips == 2


async def test_runs_nobody_waits_for_keep_their_order_for_scripts_not_loaded_yet(
    redis: Redis,
) -> None:
    """Two scripts Redis has never seen, interleaved: they run in the order sent (a run
    that missed its script used to be retried behind the commands queued after it)."""
    batch = AutoPipeline(redis)
    tag = uuid.uuid4().hex
    scripts = [
        redis.register_script(f"-- {tag} {name}\nreturn redis.call('RPUSH', KEYS[1], ARGV[1])")
        for name in ("a", "b")
    ]
    key = f"t:order:{tag}"
    sent = []
    for n in range(20):
        for name, script in zip("ab", scripts, strict=True):
            batch.send_script(script, [key], [f"{name}{n}"])
            sent.append(f"{name}{n}")
        if n == 10:
            await asyncio.sleep(0)  # some in the next round trip
    await batch.call("PING")
    for _ in range(100):
        if await redis.llen(key) == len(sent):
            break
        await asyncio.sleep(0.02)
    assert [v.decode() for v in await redis.lrange(key, 0, -1)] == sent


async def test_after_redis_drops_the_connection_the_next_batch_gets_a_new_one(
    redis: Redis, servers: Servers
) -> None:
    """Redis closed the batch's connection (as on a restart). The batch that finds it dead
    fails with redis-py's connection error (the pool's retry policy: none by default),
    unless the pool noticed at checkout; either way the batch after runs on a new one."""
    batch = AutoPipeline(redis)
    own_id = await batch.call("CLIENT", "ID")
    other = create_redis(servers.redis_url, RedisSettings())
    try:
        assert await other.execute_command("CLIENT", "KILL", "ID", own_id)
    finally:
        await other.aclose()
    with contextlib.suppress(RedisConnectionError):
        await batch.call("PING")
    assert await batch.call("PING") == b"PONG"
    assert await batch.call("CLIENT", "ID") != own_id


async def test_a_batch_without_reply_times_out_and_its_connection_is_not_reused(
    impatient: Redis,
) -> None:
    """One bound for the whole batch: past it every command fails with redis-py's timeout
    error, and the connection (its replies unread) is closed, not handed to the next batch."""
    batch = AutoPipeline(impatient)
    own_id = await batch.call("CLIENT", "ID")
    key = f"t:never:{uuid.uuid4().hex}"
    started = asyncio.get_running_loop().time()
    blocked = batch.call("BLPOP", key, 0)  # waits for ever
    behind = batch.call("PING")
    with pytest.raises(RedisTimeoutError):
        await blocked
    with pytest.raises(RedisTimeoutError):
        await behind
    assert asyncio.get_running_loop().time() - started < 10
    assert await batch.call("PING") == b"PONG"
    assert await batch.call("CLIENT", "ID") != own_id


async def test_a_bulk_runs_in_one_exchange_with_each_reply_in_its_place(redis: Redis) -> None:
    batch = CountingPipelines(redis)
    await redis.set("t:bulk:string", "x")
    commands: list[tuple[object, ...]] = [("SET", f"t:bulk:{i}", i) for i in range(1_000)]
    commands.insert(500, ("INCR", "t:bulk:string"))  # refused: not an integer
    replies = await batch.execute(commands)
    assert len(replies) == 1_001
    assert isinstance(replies[500], ResponseError)
    assert replies[:500] == replies[501:] == [b"OK"] * 500
    assert batch.round_trips == 0  # not queued with the batched commands
    assert await redis.get("t:bulk:999") == b"999"
    assert await batch.execute([]) == []


async def _query_buffer(servers: Servers, client_id: int) -> int:
    """The bytes Redis has read from a client but not yet run (`qbuf` in `CLIENT LIST`)."""
    other = create_redis(servers.redis_url, RedisSettings())
    try:
        info = (await other.execute_command("CLIENT", "LIST", "ID", client_id)).decode()
    finally:
        await other.aclose()
    fields = dict(part.split("=", 1) for part in info.split())
    return int(fields["qbuf"])


@pytest.mark.parametrize("max_in_flight", [1, 2])
async def test_a_batch_goes_out_while_the_one_ahead_waits_for_its_replies(
    redis: Redis, servers: Servers, max_in_flight: int
) -> None:
    """Pipelined on one connection: the next batch is written before the replies to the one
    ahead are read (Redis holds it, unread, behind a blocking command), up to
    `max_in_flight` batches; past that it waits for a place."""
    batch = AutoPipeline(redis, max_in_flight=max_in_flight)
    own_id = await batch.call("CLIENT", "ID")
    key = f"t:blocked:{uuid.uuid4().hex}"
    blocked = batch.call("BLPOP", key, 0.5)
    await asyncio.sleep(0.05)
    behind = batch.call("PING")  # another loop turn: another batch
    await asyncio.sleep(0.05)
    written = await _query_buffer(servers, own_id)
    assert written == (len(b"*1\r\n$4\r\nPING\r\n") if max_in_flight > 1 else 0)
    assert await blocked is None
    assert await behind == b"PONG"


async def test_pipelined_batches_run_in_the_order_their_commands_were_queued(
    redis: Redis,
) -> None:
    batch = CountingPipelines(redis)
    batch.max_in_flight = 8
    await batch.call("PING")  # connected: what follows goes out turn by turn
    key = f"t:order:{uuid.uuid4().hex}"
    replies = []
    for turn in range(50):
        replies += [batch.call("RPUSH", key, f"{turn}.{n}") for n in range(3)]
        await asyncio.sleep(0)  # the next ones in another batch, this one still in flight
    lengths = await asyncio.gather(*replies)
    assert lengths == list(range(1, 151))  # each command ran in its place
    assert [v.decode() for v in await redis.lrange(key, 0, -1)] == [
        f"{turn}.{n}" for turn in range(50) for n in range(3)
    ]
    assert batch.round_trips > 10  # many batches: the order held across them


async def test_a_failed_batch_fails_the_batches_behind_it_on_its_connection(
    impatient: Redis,
) -> None:
    """The batch behind was written on a connection whose replies are now out of step: it
    fails too, and the connection is closed; the next batch gets a new one."""
    batch = AutoPipeline(impatient, max_in_flight=2)
    own_id = await batch.call("CLIENT", "ID")
    blocked = batch.call("BLPOP", f"t:never:{uuid.uuid4().hex}", 0)  # waits for ever
    await asyncio.sleep(0.05)
    behind = batch.call("PING")
    with pytest.raises(RedisTimeoutError):
        await blocked
    with pytest.raises(RedisConnectionError, match="a batch ahead"):
        await behind
    assert await batch.call("PING") == b"PONG"
    assert await batch.call("CLIENT", "ID") != own_id


async def test_a_resp3_false_reply_is_a_reply(redis: Redis) -> None:
    """hiredis's default "no reply yet" is `False`, which RESP3 can also answer."""
    batch = AutoPipeline(redis)
    falsy = batch.call("EVAL", "redis.setresp(3); return false", 0)
    after = batch.call("PING")
    assert await falsy is False
    assert await after == b"PONG"


async def test_a_push_from_redis_is_not_taken_for_a_reply(redis: Redis) -> None:
    """A RESP3 push (here a client-tracking invalidation) arriving while a batch waits
    for its reply is not handed to that batch."""
    batch = AutoPipeline(redis)
    key = f"t:tracked:{uuid.uuid4().hex}"
    assert await batch.call("CLIENT", "TRACKING", "ON") == b"OK"
    assert await batch.call("GET", key) is None  # now tracked: a change is pushed
    waiting = batch.call("BLPOP", f"t:empty:{uuid.uuid4().hex}", 0.3)
    await asyncio.sleep(0.05)
    await redis.set(key, "changed")  # another connection: the pipeline's gets a push
    assert await waiting is None
    assert await batch.call("GET", key) == b"changed"


async def test_after_an_idle_spell_the_connection_is_checked_before_use(
    servers: Servers,
) -> None:
    """Idle past the pool's health-check interval, the connection goes back to the pool,
    and the next batch takes one that was checked with a PING (as redis-py checks it)."""
    client = create_redis(servers.redis_url, RedisSettings())
    pool = client.connection_pool
    pings = 0

    class Counting(pool.connection_class):  # type: ignore[name-defined,misc]
        async def _send_ping(self) -> None:
            nonlocal pings
            pings += 1
            await super()._send_ping()

    pool.connection_class = Counting
    pool.connection_kwargs["health_check_interval"] = 0.2
    try:
        batch = AutoPipeline(client)
        assert await batch.call("PING") == b"PONG"
        await asyncio.sleep(0.3)
        before = pings
        assert await batch.call("SET", f"t:idle:{uuid.uuid4().hex}", "x") == b"OK"
        assert pings == before + 1
        assert await batch.call("PING") == b"PONG"  # busy again: no check in between
        assert pings == before + 1
    finally:
        await client.aclose()


async def test_work_gathered_while_a_batch_waits_goes_in_the_next_one(redis: Redis) -> None:
    """`before_next_batch`: the callback runs once, just before the next batch is written,
    so what callers gather over several loop turns while a batch is in flight goes out in
    one; on an idle pipeline it runs at the end of the turn."""
    batch = CountingPipelines(redis)
    key = f"t:gathered:{uuid.uuid4().hex}"
    gathered: list[int] = []
    sent: list[asyncio.Future[Any]] = []

    def fill() -> None:
        sent.append(batch.call("RPUSH", key, *gathered))
        gathered.clear()

    blocked = batch.call("BLPOP", f"{key}:gate", 0)  # in flight until the gate opens
    await asyncio.sleep(0.05)
    for n in range(3):  # three loop turns; the first asks for the callback
        if not gathered:
            batch.before_next_batch(fill)
        gathered.append(n)
        await asyncio.sleep(0.01)
    assert sent == []  # not yet: the batch ahead still waits for its reply
    await redis.lpush(f"{key}:gate", "open")
    assert await blocked == [f"{key}:gate".encode(), b"open"]
    for _ in range(100):
        if sent:
            break
        await asyncio.sleep(0.01)
    assert [await f for f in sent] == [3]  # one command took all three
    assert await redis.lrange(key, 0, -1) == [b"0", b"1", b"2"]
    assert batch.round_trips == 2

    batch.before_next_batch(lambda: sent.append(batch.call("PING")))  # idle: this turn
    await asyncio.sleep(0.02)
    assert await sent[-1] == b"PONG"
    assert batch.round_trips == 3


async def test_gathered_work_fails_when_no_connection_can_be_had(servers: Servers) -> None:
    """A callback's commands fail with the others when Redis cannot be reached: nobody
    waits for a batch that will never be written."""
    client = create_redis("redis://127.0.0.1:1/0", RedisSettings(socket_timeout_s=0.3))
    try:
        batch = AutoPipeline(client)
        sent: list[asyncio.Future[Any]] = []
        batch.before_next_batch(lambda: sent.append(batch.call("PING")))
        for _ in range(200):
            if sent and sent[0].done():
                break
            await asyncio.sleep(0.02)
        assert len(sent) == 1
        with pytest.raises(RedisConnectionError):
            await sent[0]
    finally:
        await client.aclose()
