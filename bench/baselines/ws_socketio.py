"""Baseline: python-socketio (ASGI on uvicorn), one room per channel, `emit(..., room=)`.

python -m bench.baselines.ws_socketio --port 8103
"""

from __future__ import annotations

from typing import Any

import socketio
import uvicorn

from bench.baselines._common import arguments, maybe_freeze

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*", transports=["websocket"])
app = socketio.ASGIApp(sio)


@sio.on("subscribe")  # type: ignore[misc]
async def subscribe(sid: str, body: dict[str, Any]) -> dict[str, Any]:
    await sio.enter_room(sid, body["channel"])
    return {"ok": True}


@sio.on("publish")  # type: ignore[misc]
async def publish(sid: str, body: dict[str, Any]) -> dict[str, Any]:
    channel = body["channel"]
    await sio.emit(
        "event", {"channel": channel, "type": body["type"], "data": body["data"]}, room=channel
    )
    return {"ok": True}


def main() -> None:
    args = arguments(__doc__ or "")
    maybe_freeze(args.gc_freeze)
    print(f"ready on {args.port}", flush=True)
    # uvicorn binds (AF_INET, so uvloop sets TCP_NODELAY on every accepted socket); with
    # --procs N its workers share the listening socket.
    uvicorn.run(
        "bench.baselines.ws_socketio:app",
        host=args.host,
        port=args.port,
        workers=args.procs if args.procs > 1 else None,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
