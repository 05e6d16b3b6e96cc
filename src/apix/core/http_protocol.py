"""The HTTP protocol `apix serve` runs: uvicorn's httptools protocol, one write a response.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and the body when it sends `http.response.body`: two `send` system
calls and two TCP segments for each small JSON answer the API gives. Here the head is held
until the first body message and leaves with it, in one write, if that message comes in
the same turn of the event loop (as it does for every response the API builds whole); a
streaming response whose first chunk takes longer gets its head at the end of that turn
(uvicorn's own sends it at once). In the HTTP publish benchmark's profile the two writes
were 13% of the node's samples; joining them cut the node's CPU per publish by 17%.

Everything else is uvicorn's: parsing, keep-alive, pipelining, flow control, `100
Continue` (written at once, as before), and what a client sees when an app fails halfway:
a response that was started and not finished still ends in a closed connection, with its
head written first. `HEAD` responses, which have no body write to join, are left alone,
and a large first body (over 64 KiB) is written after its head, not copied onto it.

A connection whose first bytes are a whole, plain WebSocket upgrade request goes straight
to the WebSocket protocol class, if that class offers ``take_upgrade`` (the gateway's
does): uvicorn would parse the request into an HTTP scope, write it out again and hand
that over, to be parsed once more. Anything else, including an upgrade that arrives in
pieces, takes uvicorn's way.

Use it as ``uvicorn.Config(http=HTTP_PROTOCOL)``.
"""

from __future__ import annotations

import asyncio
from typing import cast

from uvicorn._types import ASGISendEvent
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

__all__ = ["HTTP_PROTOCOL", "ApixHttpProtocol"]


class ApixHttpProtocol(HttpToolsProtocol):
    _unaddressed = False  # the connection's addresses are looked up when a request begins

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.logger.level <= TRACE_LOG_LEVEL:  # uvicorn logs the client's address here
            super().connection_made(transport)
            return
        # uvicorn's, less the two address look-ups (on uvloop each makes a socket object
        # and several system calls), left to the first request: a connection handed to
        # the gateway at once (`data_received`) has none.
        self.connections.add(self)
        self.transport = transport
        self.flow = FlowControl(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._unaddressed = True

    def on_message_begin(self) -> None:
        if self._unaddressed:
            self._unaddressed = False
            self.server = get_local_addr(self.transport)
            self.client = get_remote_addr(self.transport)
        super().on_message_begin()

    def data_received(self, data: bytes) -> None:
        scope: object = self.scope  # None until uvicorn begins parsing a request
        if scope is None:  # the connection's first bytes: perhaps a WebSocket upgrade
            take = getattr(self.ws_protocol_class, "take_upgrade", None)
            if take is not None and take(self, data):
                return
        super().data_received(data)

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
            held = _HeadHeld(self.transport)
            self.transport = cast(asyncio.Transport, held)
            await super().send(message)
            # A body sent in this turn of the loop joins the head; one that takes longer
            # (a stream waiting for its first chunk) finds the head already gone.
            asyncio.get_running_loop().call_soon(held.flush)
            return
        await super().send(message)
        held_or_not: object = self.transport
        if isinstance(held_or_not, _HeadHeld):  # the first body message: the head is out
            self.transport = held_or_not.transport


class _HeadHeld:
    """The cycle's transport from `http.response.start` to the first body write, or to the
    end of that turn of the loop, whichever comes first. Only what uvicorn's cycle calls
    is here: anything else fails loudly instead of overtaking the held head."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # None until uvicorn writes the status line and headers; then held; b"" once out.
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self.head
        if head is None:
            self.head = data
            return
        self.head = b""
        if not head:
            self.transport.write(data)
        elif len(data) <= _JOIN_BELOW:
            self.transport.write(head + data)
        else:  # not worth copying a large body for one system call less
            self.transport.write(head)
            self.transport.write(data)

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
            self.head = b""

    def close(self) -> None:
        # The app failed between the head and the body: uvicorn closes the connection.
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


_JOIN_BELOW = 64 * 1024

HTTP_PROTOCOL = "apix.core.http_protocol:ApixHttpProtocol"
