"""The WebSocket protocol implementation APIX runs on uvicorn.

uvicorn's sans-I/O `websockets` protocol, with two additions:
- when the node shuts down, open WebSockets are closed with 4500 ("node shutting down:
  reconnect at once, to another node") instead of 1012, as PROTOCOL.md section 9 requires;
- the fan-out fast path: the ASGI scope carries the protocol under
  `extensions["apix.raw"]`, so the gateway can write an event's WebSocket frame, built once
  per event, straight to every idle subscriber's transport (`write_frame`), instead of
  encoding and framing the same text again per subscriber through the ASGI `send`.
Selected with ``uvicorn.Config(ws="apix.realtime.transport:ApixWebSocketProtocol")``.
"""

from __future__ import annotations

import struct

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

SHUTTING_DOWN = 4500
RAW_EXTENSION = "apix.raw"


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked, uncompressed text frame (RFC 6455 section 5.2) around ``payload``.

    Sent without compression even when permessage-deflate was negotiated: RFC 7692 lets
    any message go uncompressed (RSV1 clear), and it does not touch the deflate context.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class ApixWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][RAW_EXTENSION] = {"protocol": self}

    def cap_write_buffer(self, limit: int) -> None:
        """Pause writing (flow control) at ``limit`` buffered bytes at the latest, so that
        `write_frame` sees every time the buffer may have grown past it."""
        _, high = self.transport.get_write_buffer_limits()
        if limit < high:
            self.transport.set_write_buffer_limits(high=limit)

    def write_frame(self, frame: bytes) -> int:
        """Write a pre-built frame now, if the socket is open and not applying backpressure.

        Returns -1 when it was not written; otherwise 0, or the bytes the transport holds
        when this write made it pause (the only time they can have grown past a limit).
        """
        writable = self.writable
        if (
            self.close_sent
            or not self.handshake_complete
            or not writable.is_set()
            or self.transport.is_closing()
        ):
            return -1
        self.transport.write(frame)
        return 0 if writable.is_set() else int(self.transport.get_write_buffer_size())

    def shutdown(self) -> None:
        if self.close_sent or not self.handshake_complete:
            super().shutdown()
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": SHUTTING_DOWN})
        self.conn.send_close(SHUTTING_DOWN, "node shutting down")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()


WS_PROTOCOL = "apix.realtime.transport:ApixWebSocketProtocol"
