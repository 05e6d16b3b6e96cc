"""Local LLM servers speaking the real wire protocols, with failures on demand.

`FakeOpenAI` serves OpenAI's `/v1/chat/completions` (JSON, and server-sent events with
`data: [DONE]` and usage in the last chunk when `stream_options.include_usage`) and
`/v1/models`; `FakeAnthropic` serves `/v1/messages` (message_start, content_block_delta,
message_delta with usage, message_stop) and `/v1/models`. Each request takes the next
`Behaviour` from the server's script (then `default`): answer, an HTTP error, a hang past the
client's timeout, or a connection dropped after some chunks. Served by uvicorn on a real
socket, so the official SDKs talk to them over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Behaviour:
    """What one request gets."""

    text: str = "Hello from the fake model."
    input_tokens: int = 11
    output_tokens: int = 7
    status: int = 200  # != 200: an error response of the provider's shape
    error_message: str = "injected failure"
    hang_s: float = 0.0  # wait this long before answering (a timeout, seen from the client)
    drop_after: int | None = None  # stream this many deltas, then drop the connection
    stream_error_after: int | None = None  # stream this many deltas, then an SSE error event
    chunk: int = 4  # characters per delta

    def deltas(self) -> list[str]:
        return [self.text[i : i + self.chunk] for i in range(0, len(self.text), self.chunk)]


def ok(text: str = "Hello from the fake model.", **kw: Any) -> Behaviour:
    return Behaviour(text=text, **kw)


def error(status: int, message: str = "injected failure") -> Behaviour:
    return Behaviour(status=status, error_message=message)


def hang(seconds: float) -> Behaviour:
    return Behaviour(hang_s=seconds)


def drop(after: int, text: str = "Partial answer that never ends.") -> Behaviour:
    return Behaviour(text=text, drop_after=after)


class _Dropped(Exception):
    """Raised inside the app to make uvicorn cut the connection mid-body."""


@dataclass
class FakeServer:
    default: Behaviour = field(default_factory=Behaviour)
    script: deque[Behaviour] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def then(self, *behaviours: Behaviour) -> FakeServer:
        self.script.extend(behaviours)
        return self

    def next(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Bodies of the completion requests received (not the model listings)."""
        return [r for r in self.requests if r["path"].endswith(("/completions", "/messages"))]

    # --- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        payload = json.loads(body) if body else {}
        self.requests.append({"path": scope["path"], "headers": headers, "body": payload})
        behaviour = self.next()
        if behaviour.hang_s:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), behaviour.hang_s)
        if behaviour.status != 200:
            await _json(send, behaviour.status, self.error_body(behaviour))
            return
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await _json(send, 200, self.models_body())
            return
        if payload.get("stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for frame in self.frames(behaviour, payload):
                if isinstance(frame, _Dropped):
                    raise frame
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b""})
            return
        await _json(send, 200, self.completion_body(behaviour, payload))

    # --- wire formats, per protocol ---------------------------------------------------

    def error_body(self, behaviour: Behaviour) -> dict[str, Any]:
        raise NotImplementedError

    def models_body(self) -> dict[str, Any]:
        raise NotImplementedError

    def frames(self, behaviour: Behaviour, payload: dict[str, Any]) -> Iterable[bytes | _Dropped]:
        raise NotImplementedError

    def completion_body(self, behaviour: Behaviour, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


_OPENAI_ERRORS = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}


class FakeOpenAI(FakeServer):
    def error_body(self, behaviour: Behaviour) -> dict[str, Any]:
        kind = _OPENAI_ERRORS.get(behaviour.status, "server_error")
        return {
            "error": {"message": behaviour.error_message, "type": kind, "param": None, "code": kind}
        }

    def models_body(self) -> dict[str, Any]:
        model = {"id": "fake-gpt", "object": "model", "created": 1, "owned_by": "fake"}
        return {"object": "list", "data": [model]}

    def _chunk(self, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def frames(self, behaviour: Behaviour, payload: dict[str, Any]) -> Iterable[bytes | _Dropped]:
        model = payload["model"]
        yield _sse(self._chunk(model, {"role": "assistant", "content": ""}, None))
        for i, piece in enumerate(behaviour.deltas()):
            if behaviour.drop_after is not None and i >= behaviour.drop_after:
                yield _Dropped()
                return
            if behaviour.stream_error_after is not None and i >= behaviour.stream_error_after:
                yield _sse({"error": {"message": "overloaded", "type": "server_error"}})
                return
            yield _sse(self._chunk(model, {"content": piece}, None))
        yield _sse(self._chunk(model, {}, "stop"))
        if (payload.get("stream_options") or {}).get("include_usage"):
            yield _sse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": behaviour.input_tokens,
                        "completion_tokens": behaviour.output_tokens,
                        "total_tokens": behaviour.input_tokens + behaviour.output_tokens,
                    },
                }
            )
        yield _sse("[DONE]")

    def completion_body(self, behaviour: Behaviour, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": payload["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": behaviour.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": behaviour.input_tokens,
                "completion_tokens": behaviour.output_tokens,
                "total_tokens": behaviour.input_tokens + behaviour.output_tokens,
            },
        }


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class FakeAnthropic(FakeServer):
    def error_body(self, behaviour: Behaviour) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(behaviour.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": behaviour.error_message}}

    def models_body(self) -> dict[str, Any]:
        model = {
            "type": "model",
            "id": "fake-claude",
            "display_name": "Fake Claude",
            "created_at": "2025-01-01T00:00:00Z",
        }
        return {
            "data": [model],
            "has_more": False,
            "first_id": "fake-claude",
            "last_id": "fake-claude",
        }

    def frames(self, behaviour: Behaviour, payload: dict[str, Any]) -> Iterable[bytes | _Dropped]:
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": payload["model"],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": behaviour.input_tokens, "output_tokens": 1},
        }
        yield _sse({"type": "message_start", "message": message}, "message_start")
        yield _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        yield _sse({"type": "ping"}, "ping")
        for i, piece in enumerate(behaviour.deltas()):
            if behaviour.drop_after is not None and i >= behaviour.drop_after:
                yield _Dropped()
                return
            if behaviour.stream_error_after is not None and i >= behaviour.stream_error_after:
                yield _sse(
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                    "error",
                )
                return
            yield _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
                "content_block_delta",
            )
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": behaviour.output_tokens},
            },
            "message_delta",
        )
        yield _sse({"type": "message_stop"}, "message_stop")

    def completion_body(self, behaviour: Behaviour, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": behaviour.text}],
            "model": payload["model"],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": behaviour.input_tokens,
                "output_tokens": behaviour.output_tokens,
            },
        }


@asynccontextmanager
async def running(server: FakeServer) -> AsyncIterator[FakeServer]:
    """Serve ``server`` on 127.0.0.1 (a free port) for the duration of the block."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        server, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=1
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    server.port = sock.getsockname()[1]
    try:
        yield server
    finally:
        server._release.set()
        uv.should_exit = True
        await task
        sock.close()


@contextmanager
def running_in_thread(server: FakeServer) -> Iterator[FakeServer]:
    """Serve ``server`` from a thread of its own, for callers that block the test's loop."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        server, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=1
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    server.port = sock.getsockname()[1]
    try:
        yield server
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def openai_url(server: FakeServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def anthropic_url(server: FakeServer) -> str:
    return f"http://127.0.0.1:{server.port}"
