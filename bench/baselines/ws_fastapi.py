"""Baseline: a bare FastAPI WebSocket endpoint on uvicorn (uvloop, httptools).

The send loop is the FastAPI docs' `ConnectionManager.broadcast`: `await ws.send_text(...)`
for each subscriber. `POST /publish/{channel}` is the HTTP-publish baseline.

    python -m bench.baselines.ws_fastapi --port 8102
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from bench.baselines._common import arguments, error, event, maybe_freeze, reply

app = FastAPI()
channels: dict[str, set[WebSocket]] = defaultdict(set)


async def broadcast(channel: str, frame: str) -> None:
    for ws in list(channels.get(channel, ())):
        try:
            await ws.send_text(frame)
        except (WebSocketDisconnect, RuntimeError):
            channels[channel].discard(ws)


@app.websocket("/ws")
async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    mine: list[str] = []
    try:
        while True:
            command: dict[str, Any] = orjson.loads(await ws.receive_text())
            op, command_id = command.get("op"), command.get("id")
            if op == "subscribe":
                channels[command["channel"]].add(ws)
                mine.append(command["channel"])
                await ws.send_text(reply(command_id))
            elif op == "publish":
                channel = command["channel"]
                await broadcast(channel, event(channel, command["type"], command["data"]))
                await ws.send_text(reply(command_id))
            elif op == "connect":
                await ws.send_text(reply(command_id, {"type": "connection.established"}))
            elif op != "pong":
                await ws.send_text(error(command_id, f"unknown op {op!r}"))
    except WebSocketDisconnect:
        pass
    finally:
        for channel in mine:
            channels[channel].discard(ws)


@app.post("/publish/{channel}", status_code=201)
async def publish(channel: str, body: dict[str, Any]) -> dict[str, Any]:
    await broadcast(channel, event(channel, body.get("type", "message"), body.get("data")))
    return {"ok": True}


def main() -> None:
    args = arguments(__doc__ or "")
    maybe_freeze(args.gc_freeze)
    print(f"ready on {args.port}", flush=True)
    # uvicorn binds (AF_INET, so uvloop sets TCP_NODELAY on every accepted socket); with
    # --procs N its workers share the listening socket.
    uvicorn.run(
        "bench.baselines.ws_fastapi:app",
        host=args.host,
        port=args.port,
        workers=args.procs if args.procs > 1 else None,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        ws_ping_interval=20,
    )


if __name__ == "__main__":
    main()
