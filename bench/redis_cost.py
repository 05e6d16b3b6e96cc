"""Redis's own time per publish: APIX's publish script against the bare minimum.

    python -m bench.redis_cost [--publishes 32000]
    python -m bench.redis_cost --against be467cf   # this publish script against an older one

Starts the embedded Redis the harness uses (append-only file on, as `apix serve` runs it)
and publishes to one `room:` channel held at its length limit, 32 publishes in flight, as
HTTP publish drives it; the archive mark moves every 320 publishes, as the archiver moves
it. The baseline, in the same run on the same Redis, is what any stream-backed publish must
cost: one `XADD` and one `PUBLISH` per event, pipelined the same way. Redis's CPU comes from
`INFO cpu` (its process time), the script's from `INFO commandstats`.

With `--against REV`, the publish script of git revision REV and this checkout's take turns
on one Redis, round by round (32 publishes each, alternating which goes first), on two
channels held at their limit: the machine's drift falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from apix.infra.embedded import EmbeddedRedis
from apix.realtime import broker as broker_module
from apix.realtime.broker import Broker, new_event_id
from apix.realtime.channels import NAMESPACES, ChannelRef

_DATA = {"text": "x" * 60, "n": 1}  # the HTTP scenario's body size
_IN_FLIGHT = 32


async def _cpu_s(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _apix(redis: Redis, publishes: int) -> dict[str, Any]:
    broker = Broker(redis, source="bench", archive=True, count=True)
    channel = ChannelRef(f"room:{uuid.uuid4().hex[:8]}", NAMESPACES["room"], None, "bench")
    first = await broker.publish(channel, "bench.event", _DATA)
    for _ in range(channel.namespace.max_len // _IN_FLIGHT + 2):  # fill it to the limit
        await asyncio.gather(
            *(broker.publish(channel, "bench.event", _DATA) for _ in range(_IN_FLIGHT))
        )
    last = await broker.publish(channel, "bench.event", _DATA)
    await broker.mark_archived([(channel.meta_key, first.epoch, last.offset)])
    await redis.config_resetstat()
    cpu = await _cpu_s(redis)
    for turn in range(publishes // _IN_FLIGHT):
        done = await asyncio.gather(
            *(broker.publish(channel, "bench.event", _DATA) for _ in range(_IN_FLIGHT))
        )
        if turn % 10 == 9:
            await broker.mark_archived([(channel.meta_key, first.epoch, done[-1].offset)])
    cpu = await _cpu_s(redis) - cpu
    stats = await redis.info("commandstats")
    script = stats["cmdstat_evalsha"]
    calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha",))
    n = (publishes // _IN_FLIGHT) * _IN_FLIGHT
    return {
        "redis_cpu_us_per_publish": round(cpu / n * 1e6, 1),
        "script_us_per_call": round(script["usec"] / script["calls"], 1),
        # Publishes to a channel that wait for the same batch share one run (`Broker._gather`).
        "script_runs_per_publish": round(script["calls"] / n, 3),
        "script_us_per_publish": round(script["usec"] / n, 1),
        "commands_per_publish": round(calls / n, 2),
        "stream_length": await redis.xlen(channel.stream_key),
    }


async def _bare(redis: Redis, publishes: int) -> dict[str, Any]:
    from apix.core.json import dumps

    payload = dumps(_DATA)
    stream, topic = f"bench:{uuid.uuid4().hex[:8]}", "bench:topic"
    await redis.config_resetstat()
    cpu = await _cpu_s(redis)
    for _ in range(publishes // _IN_FLIGHT):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(_IN_FLIGHT):
                pipe.xadd(stream, {"d": payload}, maxlen=1000, approximate=True)
                pipe.publish(topic, payload)
            await pipe.execute()
    cpu = await _cpu_s(redis) - cpu
    n = (publishes // _IN_FLIGHT) * _IN_FLIGHT
    return {"redis_cpu_us_per_publish": round(cpu / n * 1e6, 1), "commands_per_publish": 2.0}


async def measure(publishes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="apix-redis-cost-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        redis = Redis.from_url(server.start())
        try:
            bare = await _bare(redis, publishes)
            apix = await _apix(redis, publishes)
        finally:
            await redis.aclose()
            server.stop()
    return {"publishes": publishes, "apix": apix, "bare": bare}


def _script_of(revision: str) -> str:
    """The publish script as `src/apix/realtime/broker.py` of ``revision`` builds it."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/apix/realtime/broker.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"broker_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102 - our own file
    return str(module._PUBLISH)


async def _turns(redis: Redis, scripts: dict[str, str], rounds: int) -> dict[str, float]:
    """Redis CPU per publish of each script, taking turns round by round."""
    broker = Broker(redis, source="bench", archive=True, count=True)
    shas = {name: await redis.script_load(body) for name, body in scripts.items()}
    channels = {
        name: ChannelRef(f"room:{uuid.uuid4().hex[:8]}", NAMESPACES["room"], None, "bench")
        for name in scripts
    }
    # Each channel's epoch, from a first publish; its archive mark then moves every ten
    # rounds, as the archiver moves it, so that trimming runs as in production.
    epochs = {
        name: (await broker.publish(channel, "bench.event", _DATA)).epoch
        for name, channel in channels.items()
    }
    warm = channels[next(iter(channels))].namespace.max_len // _IN_FLIGHT + 2
    spent = dict.fromkeys(scripts, 0.0)
    for turn in range(warm + rounds):
        order = list(scripts) if turn % 2 else list(reversed(scripts))
        for name in order:
            cpu = await _cpu_s(redis)
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(_IN_FLIGHT):
                    ts, event_id = int(time.time() * 1000), new_event_id()
                    payload = broker._payload(event_id, "bench.event", ts, _DATA, None)
                    keys, args = broker._publish_input(
                        channels[name], "bench.event", event_id, ts, payload, None
                    )
                    pipe.evalsha(shas[name], len(keys), *keys, *args)
                replies = await pipe.execute()
            if turn >= warm:
                spent[name] += await _cpu_s(redis) - cpu
            if turn % 10 == 9:
                last = replies[-1]  # older scripts answer a table, newer ones a string
                offset = (last[0] if isinstance(last, list) else last.split(b" ")[0]).decode()
                await broker.mark_archived([(channels[name].meta_key, epochs[name], offset)])
    return {name: round(s / (rounds * _IN_FLIGHT) * 1e6, 1) for name, s in spent.items()}


async def against(revision: str, publishes: int) -> dict[str, Any]:
    scripts = {revision: _script_of(revision), "this": broker_module._PUBLISH}
    with tempfile.TemporaryDirectory(prefix="apix-redis-cost-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        redis = Redis.from_url(server.start())
        try:
            spent = await _turns(redis, scripts, publishes // _IN_FLIGHT)
        finally:
            await redis.aclose()
            server.stop()
    return {"publishes": publishes, "redis_cpu_us_per_publish": spent}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__)
    parser.add_argument("--publishes", type=int, default=32_000)
    parser.add_argument("--against", metavar="REV", help="compare with this revision's script")
    args = parser.parse_args()
    if args.against:
        result = asyncio.run(against(args.against, args.publishes))
        print(json.dumps(result))
        spent = result["redis_cpu_us_per_publish"]
        print(
            f"Redis CPU per publish (with an INFO call per 32): {args.against} "
            f"{spent[args.against]} µs, this checkout {spent['this']} µs"
        )
        return
    result = asyncio.run(measure(args.publishes))
    apix, bare = result["apix"], result["bare"]
    ratio = apix["redis_cpu_us_per_publish"] / bare["redis_cpu_us_per_publish"]
    print(json.dumps(result))
    print(
        f"Redis CPU per publish: APIX script {apix['redis_cpu_us_per_publish']} µs "
        f"({apix['commands_per_publish']} commands, {apix['script_runs_per_publish']} script "
        f"runs, {apix['script_us_per_publish']} µs in scripts), "
        f"bare XADD+PUBLISH {bare['redis_cpu_us_per_publish']} µs: {ratio:.2f} times"
    )


if __name__ == "__main__":
    main()
