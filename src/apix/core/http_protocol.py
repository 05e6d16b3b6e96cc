"""The HTTP protocol `apix serve` runs: uvicorn's httptools protocol, one write a response.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and the body when it sends `http.response.body`: two `send` system
calls and two TCP segments for each small JSON answer the API gives. Here the head is held
until the first body message and leaves with it, in one write. In the HTTP publish
benchmark's profile the two writes were 13% of the node's CPU.

Everything else is uvicorn's: parsing, keep-alive, pipelining, flow control, `100
Continue` (written at once, as before), and what a client sees when an app fails halfway:
a response that was started and not finished still ends in a closed connection, with its
head written first. `HEAD` responses, which have no body write to join, are left alone.
Use it as ``uvicorn.Config(http=HTTP_PROTOCOL)``.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["HTTP_PROTOCOL", "ApixHttpProtocol"]


class ApixHttpProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:
            # Made just now by uvicorn; its task has not run yet, so every send is ours.
            cycle.__class__ = _Cycle


class _Cycle(RequestResponseCycle):
    async def send(self, message: ASGISendEvent) -> None:
        if (
            message["type"] == "http.response.start"
            and not self.response_started
            and self.scope["method"] != "HEAD"
        ):
            self.transport = cast(asyncio.Transport, _HeadHeld(self.transport))
            await super().send(message)
            return
        await super().send(message)
        held: object = self.transport
        if isinstance(held, _HeadHeld):  # the first body message: the head went out with it
            self.transport = held.transport


class _HeadHeld:
    """The cycle's transport from `http.response.start` to the first body write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None  # the status line and headers, until the body comes

    def write(self, data: bytes) -> None:
        head = self.head
        if head is None:
            self.head = data
            return
        self.head = b""
        self.transport.write(head + data if head else data)

    def close(self) -> None:
        # The app failed between the head and the body: uvicorn closes the connection.
        if self.head:
            self.transport.write(self.head)
            self.head = b""
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


HTTP_PROTOCOL = "apix.core.http_protocol:ApixHttpProtocol"
