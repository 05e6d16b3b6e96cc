"""Baseline: a bare `websockets` server with `websockets.broadcast` (the Python ceiling).

python -m bench.baselines.ws_websockets --port 8101
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from typing import Any

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.baselines._common import arguments, error, event, listening_socket, maybe_freeze, reply

channels: dict[str, set[ServerConnection]] = defaultdict(set)


async def handler(ws: ServerConnection) -> None:
    mine: list[str] = []
    try:
        async for message in ws:
            command: dict[str, Any] = orjson.loads(message)
            op, command_id = command.get("op"), command.get("id")
            if op == "subscribe":
                channels[command["channel"]].add(ws)
                mine.append(command["channel"])
                await ws.send(reply(command_id))
            elif op == "publish":
                channel = command["channel"]
                broadcast(
                    channels.get(channel, ()), event(channel, command["type"], command["data"])
                )
                await ws.send(reply(command_id))
            elif op == "connect":
                await ws.send(reply(command_id, {"type": "connection.established"}))
            elif op != "pong":
                await ws.send(error(command_id, f"unknown op {op!r}"))
    finally:
        for channel in mine:
            channels[channel].discard(ws)


async def main() -> None:
    args = arguments(__doc__ or "")
    sock = listening_socket(args.host, args.port, reuse_port=args.reuse_port)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    # compression off (as for every server here); websockets' own pings stay on (20 s).
    async with serve(handler, sock=sock, compression=None, max_queue=64):
        maybe_freeze(args.gc_freeze)
        print(f"ready on {args.port}", flush=True)
        await stop


if __name__ == "__main__":
    uvloop.run(main())
