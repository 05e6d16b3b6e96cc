"""The WebSocket protocol implementation APIX runs on uvicorn.

uvicorn's sans-I/O `websockets` protocol, with one change: when the node shuts down, open
WebSockets are closed with 4500 ("node shutting down: reconnect at once, to another node")
instead of 1012, as PROTOCOL.md section 9 requires. Selected with
``uvicorn.Config(ws="apix.realtime.transport:ApixWebSocketProtocol")``.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

SHUTTING_DOWN = 4500


class ApixWebSocketProtocol(WebSocketsSansIOProtocol):
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
