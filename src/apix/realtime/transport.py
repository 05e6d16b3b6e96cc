"""The WebSocket protocol the gateway runs on: a uvicorn ``ws`` protocol class of its own.

uvicorn hands an upgrade request to this class on the same port as the HTTP API
(``uvicorn.Config(ws=WS_PROTOCOL)``, as ``apix serve`` does). It answers a plain upgrade
request itself (anything unusual goes to `websockets`' handshake parser), speaks RFC 6455
with `websockets`' sans-I/O frame parser and drives the gateway by callbacks, with no ASGI
app in between:

- a connection is a protocol object, its parser and the gateway's `Peer`: no task, queue,
  event or suspended coroutine is held per idle connection (an ASGI WebSocket needs a task
  and a receive queue each, for as long as it is open);
- frames the gateway builds once per event are written as they are to every subscriber's
  transport (`write_frame`), instead of being encoded and framed again per subscriber;
- when the node shuts down, open WebSockets are closed with 4500 ("node shutting down:
  reconnect at once, to another node"), as PROTOCOL.md section 9 requires.

Only the gateway's path is served here; an upgrade on any other path is answered 404, and
the upgrade is refused with an HTTP error in the API's error model when the node is not
ready or shutting down (503) or the ``Origin`` is not allowed (403). On another ASGI
server, the gateway's ASGI endpoint (`apix.realtime.gateway.Gateway.__call__`) serves the
same protocol without the fast path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import struct
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Protocol

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader, NegotiationError
from websockets.extensions import Extension
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import (
    build_extension,
    parse_connection,
    parse_extension,
    parse_subprotocol,
    parse_upgrade,
)
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as FrameProtocol
from websockets.protocol import Side, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.utils import accept_key

try:  # websockets' C version, as its own parser uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the extension
    from websockets.utils import apply_mask

from apix.core.errors import error_content
from apix.core.json import dumps

SHUTTING_DOWN = 4500
SUBPROTOCOL = "apix.v1"
WS_PATH = "/api/v1/apix/ws"
# A peer that does not answer our close frame in time is cut off.
CLOSE_TIMEOUT_S = 5.0

_log = logging.getLogger("apix.websocket")
_TEXT = Opcode.TEXT
_CONT = Opcode.CONT
_CLOSE = Opcode.CLOSE
_BINARY = Opcode.BINARY


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


class Peer(Protocol):
    """What a socket drives: the gateway's client connection."""

    def received(self, text: str | None) -> None:
        """A whole message arrived (``None``: it was binary)."""

    def lost(self, code: int) -> None:
        """The socket is gone: the peer closed it with ``code``, or it dropped (1006)."""


class Acceptor(Protocol):
    """What accepts connections: the node's gateway (``app.state.gateway``)."""

    closing: bool

    def allows_origin(self, origin: str | None) -> bool: ...

    def open(self, socket: Any, origin: str | None) -> Peer: ...


class ApixWebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection on uvicorn, driven by callbacks (see the module doc)."""

    __slots__ = (
        "_close_timer",
        "_closed",
        "_config",
        "_connections",
        "_direct",
        "_drained",
        "_fragments",
        "_held",
        "_needed",
        "_paused",
        "conn",
        "peer",
        "transport",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self._config = config
        self._connections: set[Any] = server_state.connections
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # None until the upgrade request arrives; websockets' handshake parser while it
        # answers an unusual one; once upgraded, a frame parser alone (a handshake parser
        # would keep the request and its headers for the connection's life).
        self.conn: FrameProtocol | None = None
        self.peer: Peer | None = None
        self._fragments: tuple[bool, list[bytes]] | None = None  # (text?, parts so far)
        self._paused = False  # the transport holds more than its high-water mark
        self._drained: asyncio.Future[None] | None = None  # `send_text` callers waiting
        self._closed = False  # a close frame was sent or the socket is gone
        self._close_timer: asyncio.TimerHandle | None = None
        self._direct = False  # frames are read by `_read_direct` (see there)
        self._held = bytearray()  # the start of a frame `_read_direct` has not all of yet
        self._needed = 0  # that frame's length, once its header is in

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:  # the upgrade request: uvicorn passes it on in one piece
            try:
                self._upgrade(data)
            except Exception:  # never out of uvicorn's hands with our protocol half set up
                _log.exception("websocket: upgrade failed")
                self._closed = True
                self.transport.abort()
            return
        if self._direct:
            self._read_direct(data)
        else:
            self._parse(conn, data)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._closed = True
        self._wake_writers()
        close = self.conn.close_rcvd if self.conn is not None else None
        self._gone(close.code if close is not None else 1006)

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed WebSocket is of no use

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # --- uvicorn -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client to reconnect elsewhere (4500) and go."""
        if self.peer is not None and not self._closed:
            self.close(SHUTTING_DOWN, "node shutting down")
            self._gone(SHUTTING_DOWN)
        self.transport.close()

    # --- what the gateway uses (apix.realtime.connection.Socket) -------------------------

    def cap_write_buffer(self, limit: int) -> None:
        """Pause writing (flow control) at ``limit`` buffered bytes at the latest, so that
        `write_frame` sees every time the buffer may have grown past it."""
        _, high = self.transport.get_write_buffer_limits()
        if limit < high:
            self.transport.set_write_buffer_limits(high=limit)

    def writable(self) -> bool:
        return not (self._closed or self._paused)

    def write_frame(self, frame: bytes) -> int:
        """Write a pre-built frame now, if the socket is open and not applying backpressure.

        Returns -1 when it was not written; otherwise 0, or the bytes the transport holds
        when this write made it pause (the only time they can have grown past a limit).
        """
        if self._closed or self._paused:
            return -1
        transport = self.transport
        transport.write(frame)
        return int(transport.get_write_buffer_size()) if self._paused else 0

    async def send_text(self, text: str) -> None:
        """Send one text message, waiting while the client is not reading."""
        while self._paused and not self._closed:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._closed:
            raise ConnectionResetError("the WebSocket is closed")
        self.transport.write(text_frame(text.encode()))

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the socket goes once the client answers, or after
        `CLOSE_TIMEOUT_S` in any case."""
        if self._closed or self.conn is None:
            return
        self._closed = True
        self._wake_writers()
        # Not once websockets sent one: its echo of the client's close, read in the same
        # chunk as the message that made us close, or its answer to a protocol error.
        if self.conn.state is State.OPEN:
            self.conn.send_close(code, reason[:120])  # a close frame's reason: 123 bytes at most
            self._flush()
        self.transport.resume_reading()  # for the client's answer, even if commands waited
        self._close_timer = asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT_S, self.transport.abort
        )

    def abort(self) -> None:
        self.transport.abort()

    def pause_reading(self) -> None:
        if not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._closed:
            self.transport.resume_reading()

    # --- internals ----------------------------------------------------------------------

    @classmethod
    def take_upgrade(cls, http: Any, data: bytes) -> bool:
        """Take over the connection of ``http`` (uvicorn's HTTP protocol, before it parsed
        anything) if its first bytes ``data`` are a whole, plain upgrade request: answered
        as uvicorn's hand-over would have it answered, without parsing it into an HTTP
        scope first (`ApixHttpProtocol.data_received`). False, and nothing done, otherwise.
        """
        if not data.startswith(b"GET ") or _UPGRADE_FIELD.search(data) is None:
            return False  # an ordinary request (or the start of one) for uvicorn
        plain = _plain_upgrade(data, http.config.ws_per_message_deflate)
        if plain is None:
            return False
        # What uvicorn's `handle_websocket_upgrade` does, with the request already parsed.
        http.connections.discard(http)
        protocol = cls(config=http.config, server_state=http.server_state, app_state=http.app_state)
        protocol.connection_made(http.transport)
        http.transport.set_protocol(protocol)
        try:
            protocol._accept(plain)
        except Exception:  # as in `data_received`: never half set up
            _log.exception("websocket: upgrade failed")
            protocol._closed = True
            protocol.transport.abort()
        return True

    def _upgrade(self, data: bytes) -> None:
        """The opening handshake (RFC 6455 section 4.2), on the request uvicorn parsed."""
        config = self._config
        plain = _plain_upgrade(data, config.ws_per_message_deflate)
        if plain is None:
            # Anything unusual (a header given twice, a bad key, another method...):
            # websockets' handshake parser answers it, the same 101 or its error.
            self.conn = ServerProtocol(
                extensions=_deflate() if config.ws_per_message_deflate else None,
                select_subprotocol=_select_subprotocol,
                max_size=config.ws_max_size,
                logger=_log,
            )
            self.data_received(data)
            return
        self._accept(plain)

    def _accept(self, plain: Upgrade) -> None:
        """Answer a plain upgrade request (`_plain_upgrade`): 101, or the refusal."""
        path, origin, response, extensions, rest = plain
        gateway = self._admit(path, origin)
        if gateway is not None:
            self.transport.write(response)
            self._open(gateway, origin, extensions, rest)

    def _handshake(self, request: Request) -> None:
        """An upgrade request parsed by websockets (see `_upgrade`)."""
        handshake = self.conn
        assert isinstance(handshake, ServerProtocol)  # noqa: S101 - first event only
        origins = request.headers.get_all("Origin")
        if len(origins) > 1:
            self._refuse(400, "bad_request", "more than one Origin header")
            return
        origin = origins[0] if origins else None
        gateway = self._admit(request.path, origin)
        if gateway is None:
            return
        response = handshake.accept(request)
        handshake.send_response(response)
        self._flush()
        if response.status_code == 101:  # else a malformed upgrade: websockets answered it
            self._open(gateway, origin, handshake.extensions, bytes(handshake.reader.buffer))

    def _admit(self, target: str, origin: str | None) -> Acceptor | None:
        """The gateway, if it takes this upgrade; otherwise the refusal is sent."""
        gateway = _acceptor(self._config.loaded_app)
        path = target.partition("?")[0]
        if path not in (WS_PATH, self._config.root_path + WS_PATH):
            self._refuse(404, "not_found", "no WebSocket endpoint here")
        elif gateway is None or gateway.closing:
            self._refuse(503, "unavailable", "node not ready or shutting down")
        elif not gateway.allows_origin(origin):
            self._refuse(403, "forbidden", "origin not allowed")
        else:
            return gateway
        return None

    def _open(
        self, gateway: Acceptor, origin: str | None, extensions: list[Extension], rest: bytes
    ) -> None:
        frames = FrameProtocol(
            Side.SERVER, state=State.OPEN, max_size=self._config.ws_max_size, logger=_log
        )
        frames.extensions = extensions
        self.conn = frames
        self._direct = not extensions  # a compressed frame is websockets' to read
        self.peer = gateway.open(self, origin)
        if rest:  # frames sent before the 101 arrived
            self.data_received(rest)

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = dumps(error_content(code, message))
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
        )
        self.transport.write(Response(status, HTTPStatus(status).phrase, headers, body).serialize())
        self._closed = True
        self.transport.close()

    def _parse(self, conn: FrameProtocol, data: bytes) -> None:
        """Feed ``data`` to websockets' parser and act on what it makes of it."""
        conn.receive_data(data)
        for event in conn.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._handshake(event)
        if conn.parser_exc is not None and conn.close_sent is not None:
            # A protocol violation (bad framing, invalid UTF-8, too large): websockets
            # queued the matching close frame (1002, 1007, 1009…) and ends the stream.
            self._gone(conn.close_sent.code)

    def _read_direct(self, data: bytes) -> None:
        """Read the frames in ``data``, the ones clients nearly always send here: final,
        masked text frames, each a command, read and unmasked without websockets' parser
        (which runs a generator per frame and several per header field: about 4 µs a
        frame, against 1.4 here, in a micro-benchmark of `data_received`).

        Every other frame (control frames, fragments, binary, reserved bits, an unmasked
        frame) goes whole to websockets' parser, which this way always stands at a frame's
        start: it answers pings and closes, reassembles fragments and refuses what RFC 6455
        forbids, as it does for the rest. The start of a frame not all here yet is kept for
        the next read (and not parsed again until it is whole); a frame over `_HOLD_MAX` bytes
        not all here, over the size limit, or refused from its header alone hands the rest
        of the stream to websockets' parser for good.
        """
        conn = self.conn
        assert conn is not None  # noqa: S101 - set before `_direct`
        if self._held:
            held = self._held
            held += data
            if len(held) < self._needed:
                return  # still not the whole frame: nothing to parse again
            data, self._held = bytes(held), bytearray()
        limit = self._config.ws_max_size
        pos, end, needed = 0, len(data), 0
        while pos < end:
            if end - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            size = second & 0x7F
            head = pos + 2
            if size == 126:
                size = int.from_bytes(data[head : head + 2], "big")
                head += 2
            elif size == 127:
                size = int.from_bytes(data[head : head + 8], "big")
                head += 8
            masked = second & 0x80
            if masked:
                head += 4
            if head > end:
                break  # the header is not all here yet
            stop = head + size
            if stop > end:
                if size <= _HOLD_MAX and size <= limit and _well_formed(first, masked, size):
                    needed = stop - pos
                    break  # the rest comes with the next read
                # Too long to hold, or refused from its header alone: websockets' parser
                # answers it now (1002, 1009) and takes the rest of the stream.
                self._direct = False
                self._parse(conn, data[pos:])
                return
            if first == 0x81 and masked and size <= limit and self._fragments is None:
                self._deliver(True, apply_mask(data[head:stop], data[head - 4 : head]))
            else:
                self._parse(conn, data[pos:stop])
                if conn.parser_exc is not None:  # it failed the connection: what follows
                    self._direct = False  # is for it to discard
                    return
            pos = stop
        if pos < end:  # kept, with how long the frame is (0: its header is not all here)
            self._held, self._needed = bytearray(data[pos:]), needed

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if frame.fin:
                self._deliver(opcode is _TEXT, bytes(frame.data))
            else:
                self._fragments = (opcode is _TEXT, [bytes(frame.data)])
        elif opcode is _CONT and self._fragments is not None:
            text, parts = self._fragments
            parts.append(bytes(frame.data))
            if frame.fin:
                self._fragments = None
                self._deliver(text, b"".join(parts))
        elif opcode is _CLOSE and self.conn is not None:
            # websockets queued the echo (or this answers our close) and ends the stream.
            close = self.conn.close_rcvd
            self._gone(close.code if close is not None else 1005)

    def _deliver(self, text: bool, data: bytes) -> None:
        peer = self.peer
        if peer is None or self._closed:
            return  # past our close frame: discarded until the client's close arrives
        if not text:
            peer.received(None)
            return
        try:
            decoded = data.decode()
        except UnicodeDecodeError:
            self.close(1007, "invalid UTF-8")
            self._gone(1007)
            return
        peer.received(decoded)

    def _flush(self) -> None:
        if self.conn is None:
            return
        writes = self.conn.data_to_send()
        if writes:
            self.transport.write(b"".join(writes))
            if not writes[-1]:  # websockets ends the stream: the connection is over
                self._closed = True
                self.transport.close()

    def _gone(self, code: int) -> None:
        """Tell the gateway once that the socket is closing or closed."""
        self._closed = True
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.lost(code)

    def _wake_writers(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


class AsgiSocket:
    """The same socket over ASGI, for servers other than uvicorn with `WS_PROTOCOL`: no
    fast path (every frame goes through ``send``), and the server does the flow control."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._closing: asyncio.Future[None] | None = None

    async def serve(self, receive: Any, peer: Peer) -> None:
        """Feed ``peer`` until the client is gone; return once our close frame is out."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                peer.lost(int(message.get("code", 1000)))
                break
            peer.received(message.get("text"))
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._closing, CLOSE_TIMEOUT_S)

    def cap_write_buffer(self, limit: int) -> None:
        pass

    def writable(self) -> bool:
        return False

    def write_frame(self, frame: bytes) -> int:
        return -1

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    def close(self, code: int, reason: str = "") -> None:
        if self._closing is None:
            message = {"type": "websocket.close", "code": code, "reason": reason[:120]}
            self._closing = asyncio.ensure_future(self._send(message))

    def abort(self) -> None:
        if self._closing is not None:
            self._closing.cancel()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


# The 101's fixed part (RFC 6455 section 4.2.2) and the limits websockets' own parser
# applies, so that both paths take and refuse the same requests.
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
_HEADER_NAME = re.compile(rb"[-!#$%&\'*+.^_`|~0-9a-zA-Z]+")
_HEADER_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
_MAX_HEADERS = 128
# The longest frame `_read_direct` keeps the start of while the rest is on its way.
_HOLD_MAX = 64 * 1024


def _well_formed(first: int, masked: int, size: int) -> bool:
    """Whether a client's frame header, without extensions, is one websockets' parser would
    read on (masked, reserved bits clear, a known opcode; a control frame final and at most
    125 bytes), not refuse at once."""
    opcode = first & 0x0F
    if not masked or first & 0x70 or opcode not in (0, 1, 2, 8, 9, 10):
        return False
    return opcode < 8 or (bool(first & 0x80) and size <= 125)


_UPGRADE_FIELD = re.compile(rb"\r\nupgrade:", re.IGNORECASE)
_MAX_LINE = 8192 - 2  # a line and its CRLF

Upgrade = tuple[str, str | None, bytes, list[Extension], bytes]


def _plain_upgrade(data: bytes, deflate: bool) -> Upgrade | None:
    """Accept a well-formed upgrade request without websockets' general parser.

    Returns the request target, its ``Origin``, the 101 response, the extensions agreed and
    the bytes after the request; ``None`` for a request this does not take (a header given
    twice, a request body, a malformed key, version, subprotocol or extension offer, another
    method or version). websockets' parser then answers it as before, with the same 101 or
    its error, so only the cost differs: that parser took about a seventh of a connect.
    """
    head, end, rest = data.partition(b"\r\n\r\n")
    request_line, *lines = head.split(b"\r\n")
    method, _, target_version = request_line.partition(b" ")
    target, _, version = target_version.partition(b" ")
    if (
        not end
        or method != b"GET"
        or version != b"HTTP/1.1"
        or len(request_line) > _MAX_LINE
        or len(lines) > _MAX_HEADERS
    ):
        return None
    headers: dict[bytes, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if (
            not colon
            or len(line) > _MAX_LINE
            or not _HEADER_NAME.fullmatch(name)
            or not _HEADER_VALUE.fullmatch(value)
        ):
            return None
        name = name.lower()
        if name in headers:
            return None
        headers[name] = value.decode("iso-8859-1")
    if b"transfer-encoding" in headers or headers.get(b"content-length", "0") != "0":
        return None
    try:
        key = headers[b"sec-websocket-key"]
        if (
            headers[b"sec-websocket-version"] != "13"
            or len(base64.b64decode(key, validate=True)) != 16
            or not any(o.lower() == "upgrade" for o in parse_connection(headers[b"connection"]))
            or [u.lower() for u in parse_upgrade(headers[b"upgrade"])] != ["websocket"]
        ):
            return None
        offered = headers.get(b"sec-websocket-protocol")
        subprotocol = offered is not None and SUBPROTOCOL in parse_subprotocol(offered)
        extensions_header, extensions = _negotiate(
            headers.get(b"sec-websocket-extensions") if deflate else None
        )
        path = target.decode("ascii")
    except (KeyError, ValueError, InvalidHeader):  # binascii.Error is a ValueError
        return None
    response = [_SWITCHING, b"Sec-WebSocket-Accept: ", accept_key(key).encode(), b"\r\n"]
    if extensions_header is not None:
        response += [b"Sec-WebSocket-Extensions: ", extensions_header.encode(), b"\r\n"]
    if subprotocol:
        response.append(b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n")
    response.append(b"\r\n")
    return path, headers.get(b"origin"), b"".join(response), extensions, rest


def _negotiate(offer: str | None) -> tuple[str | None, list[Extension]]:
    """permessage-deflate, agreed as websockets' server does (`process_extensions`)."""
    if offer is None:
        return None, []
    agreed: list[tuple[Any, Any]] = []
    extensions: list[Extension] = []
    factories = _deflate()
    for name, params in parse_extension(offer):
        for factory in factories:
            if factory.name != name:
                continue
            try:
                response_params, extension = factory.process_request_params(params, extensions)
            except NegotiationError:
                continue
            agreed.append((name, response_params))
            extensions.append(extension)
            break
    return (build_extension(agreed) if agreed else None), extensions


def _deflate() -> list[ServerPerMessageDeflateFactory]:
    # As uvicorn configures it: small windows, so a compressing client costs little memory.
    return [
        ServerPerMessageDeflateFactory(
            server_max_window_bits=12,
            client_max_window_bits=12,
            compress_settings={"memLevel": 5},
        )
    ]


def _select_subprotocol(_: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``apix.v1`` when offered; otherwise none (the subprotocol is optional)."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


def _acceptor(app: Any) -> Acceptor | None:
    """The gateway of the app uvicorn serves, found through its middleware (``.app``)."""
    while app is not None:
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:
            return gateway  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
    return None


WS_PROTOCOL = "apix.realtime.transport:ApixWebSocketProtocol"
