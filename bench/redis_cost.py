"""Redis's own time per publish: APIX's publish script against the bare minimum.

    python -m bench.redis_cost [--publishes 32000]

Starts the embedded Redis the harness uses (append-only file on, as `apix serve` runs it)
and publishes to one `room:` channel held at its length limit, 32 publishes in flight, as
HTTP publish drives it; the archive mark moves every 320 publishes, as the archiver moves
it. The baseline, in the same run on the same Redis, is what any stream-backed publish must
cost: one `XADD` and one `PUBLISH` per event, pipelined the same way. Redis's CPU comes from
`INFO cpu` (its process time), the script's from `INFO commandstats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from apix.infra.embedded import EmbeddedRedis
from apix.realtime.broker import Broker
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__)
    parser.add_argument("--publishes", type=int, default=32_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.publishes))
    apix, bare = result["apix"], result["bare"]
    ratio = apix["redis_cpu_us_per_publish"] / bare["redis_cpu_us_per_publish"]
    print(json.dumps(result))
    print(
        f"Redis CPU per publish: APIX script {apix['redis_cpu_us_per_publish']} µs "
        f"({apix['commands_per_publish']} commands, script {apix['script_us_per_call']} µs), "
        f"bare XADD+PUBLISH {bare['redis_cpu_us_per_publish']} µs: {ratio:.2f} times"
    )


if __name__ == "__main__":
    main()
