"""What every Python baseline shares: the command line, a listening socket, the replies.

The baselines speak the subset of PROTOCOL.md the load generator uses (`connect`,
`subscribe`, `publish`, replies, `event` frames), so one generator drives them and APIX.
"""

from __future__ import annotations

import argparse
import gc
import socket
from typing import Any

import orjson


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT so several copies share the port (over 19.5k connections)",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="uvicorn worker processes sharing the listening socket (uvicorn baselines)",
    )
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start-up")
    return parser.parse_args()


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def maybe_freeze(enabled: bool) -> None:
    if enabled:
        gc.collect()
        gc.freeze()


def reply(command_id: Any, result: dict[str, Any] | None = None) -> str:
    return orjson.dumps(
        {"op": "reply", "id": command_id, "ok": True, "result": result or {}}
    ).decode()


def error(command_id: Any, message: str) -> str:
    frame = {
        "op": "reply",
        "id": command_id,
        "ok": False,
        "error": {"code": "bad_request", "message": message},
    }
    return orjson.dumps(frame).decode()


def event(channel: str, event_type: str, data: Any) -> str:
    """The event frame, serialised once per publish."""
    return orjson.dumps(
        {"op": "event", "channel": channel, "type": event_type, "data": data}
    ).decode()
