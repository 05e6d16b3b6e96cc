"""The gateway reads the frames clients nearly always send (final, masked text frames)
without websockets' parser, and hands it every other frame whole (`_read_direct`).

The property: for any stream of frames, valid or not, cut into reads anywhere, the
connection does what websockets' parser alone makes it do: the same messages reach the
gateway, in the same order, and the same close code ends it; the client gets the same
pongs, and a close frame if it got one before. (Only the order of what goes back may
differ: websockets alone parses a whole read before the gateway sees its first message, so
a ping or a close later in the read is answered before a close the message caused; read
directly, the frames are acted on one by one.) The live tests in test_transport.py cover
the same paths on a real socket.
"""

from __future__ import annotations

import asyncio
import os
import struct
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apix.realtime.transport import _HOLD_MAX, ApixWebSocketProtocol


class _Transport:
    """The end of a socket: what was written, and whether it was closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Peer:
    """The gateway's side: every message and the close, in order."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def received(self, text: str | None) -> None:
        self.seen.append(text)

    def lost(self, code: int) -> None:
        self.seen.append(("lost", code))


class _Gateway:
    closing = False

    def __init__(self) -> None:
        self.peer = _Peer()

    def allows_origin(self, origin: str | None) -> bool:
        return True

    def open(self, socket: Any, origin: str | None) -> _Peer:
        return self.peer


def _opened(limit: int) -> tuple[ApixWebSocketProtocol, _Transport, _Gateway]:
    """A connection just upgraded, without extensions (call in a running loop)."""
    config = SimpleNamespace(loaded=True, ws_max_size=limit, ws_per_message_deflate=False)
    protocol = ApixWebSocketProtocol(config, SimpleNamespace(connections=set()), {})
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    gateway = _Gateway()
    protocol._open(gateway, None, [], b"")
    assert protocol._direct  # without extensions, the direct reader is on
    return protocol, transport, gateway


def _sent(data: bytes) -> tuple[list[bytes], int]:
    """The pongs' payloads in what the server wrote (sorted), and how many closes."""
    pongs, close, pos = [], 0, 0
    while pos < len(data):
        first, size, pos = data[pos], data[pos + 1] & 0x7F, pos + 2
        if size == 126:
            size, pos = struct.unpack("!H", data[pos : pos + 2])[0], pos + 2
        payload, pos = data[pos : pos + size], pos + size
        if first == 0x8A:
            pongs.append(payload)
        close += first == 0x88
    return sorted(pongs), close


def _run(
    reads: list[bytes], *, direct: bool, limit: int
) -> tuple[list[Any], tuple[list[bytes], int], bool]:
    async def go() -> tuple[list[Any], tuple[list[bytes], int], bool]:
        protocol, transport, gateway = _opened(limit)
        protocol._direct = direct
        for data in reads:
            protocol.data_received(data)
        protocol.connection_lost(None)
        if protocol._close_timer is not None:
            protocol._close_timer.cancel()
        return gateway.peer.seen, _sent(b"".join(transport.written)), transport.closed

    return asyncio.run(go())


def _frame(first: int, payload: bytes, *, masked: bool = True) -> bytes:
    """A frame as a client sends it: ``first`` is FIN, RSV and the opcode."""
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


_TEXT = st.text(max_size=300).map(str.encode)
_FRAMES = st.one_of(
    _TEXT.map(lambda p: [_frame(0x81, p)]),  # what clients send: most of the examples
    _TEXT.map(lambda p: [_frame(0x81, p)]),
    st.binary(max_size=200).map(lambda p: [_frame(0x81, p)]),  # maybe not UTF-8
    st.binary(max_size=50).map(lambda p: [_frame(0x82, p)]),  # binary
    st.binary(max_size=20).map(lambda p: [_frame(0x89, p)]),  # ping: answered with a pong
    st.binary(max_size=20).map(lambda p: [_frame(0x8A, p)]),  # pong
    st.tuples(_TEXT, _TEXT, _TEXT).map(  # a fragmented message
        lambda p: [_frame(0x01, p[0]), _frame(0x00, p[1]), _frame(0x80, p[2])]
    ),
    _TEXT.map(lambda p: [_frame(0x01, p)]),  # a fragment left open: the next text is an error
    _TEXT.map(lambda p: [_frame(0x80, p)]),  # a continuation of nothing
    _TEXT.map(lambda p: [_frame(0x81, p, masked=False)]),  # unmasked: refused (1002)
    _TEXT.map(lambda p: [_frame(0xC1, p)]),  # a reserved bit: refused (1002)
    st.sampled_from([b"\x03\xe8", b"\x03\xe8bye", b""]).map(lambda p: [_frame(0x88, p)]),
    st.just([_frame(0x81, b"x" * 2_000)]),  # over the small limit below
    st.just([_frame(0x81, b"y" * (_HOLD_MAX + 10))]),  # longer than what is held
)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[list[bytes], int]:
    frames = [part for group in draw(st.lists(_FRAMES, max_size=8)) for part in group]
    stream = b"".join(frames)
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=6)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    limit = draw(st.sampled_from([1_000, 1 << 20]))
    return [r for r in reads if r], limit


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams())
def test_the_direct_reader_does_what_websockets_parser_does(
    stream: tuple[list[bytes], int],
) -> None:
    reads, limit = stream
    assert _run(reads, direct=True, limit=limit) == _run(reads, direct=False, limit=limit)


async def test_commands_cut_into_pieces_arrive_whole_and_are_still_read_directly() -> None:
    protocol, _, gateway = _opened(1_000)
    one, two = _frame(0x81, b'{"op":"ping"}'), _frame(0x81, b"x" * 300)  # a 16-bit length
    for data in (one[:1], one[1:3], one[3:9], one[9:] + two[:3], two[3:]):
        protocol.data_received(data)
        assert protocol._direct  # the starts were kept back, not handed to websockets
    assert gateway.peer.seen == ['{"op":"ping"}', "x" * 300]


async def test_commands_after_a_fragmented_message_are_read_directly_again() -> None:
    protocol, _, gateway = _opened(1_000)
    command = _frame(0x81, b"ef")
    protocol.data_received(_frame(0x01, b"ab") + _frame(0x80, b"cd") + command[:3])
    assert protocol._direct  # the command's start was held: websockets never saw it
    protocol.data_received(command[3:])
    assert protocol._direct
    assert gateway.peer.seen == ["abcd", "ef"]


async def test_a_frame_refused_by_its_header_is_answered_before_its_payload_arrives() -> None:
    """An unmasked frame is a protocol error (1002) whatever follows: not held."""
    protocol, transport, gateway = _opened(1_000)
    protocol.data_received(_frame(0x81, b"x" * 300, masked=False)[:10])
    assert gateway.peer.seen == [("lost", 1002)]
    assert _sent(b"".join(transport.written)) == ([], 1)
    if protocol._close_timer is not None:
        protocol._close_timer.cancel()


def test_a_message_that_closes_the_connection_read_with_the_clients_close_fails_nothing() -> None:
    """websockets alone (as with compression) answers the client's close while it parses
    the read: the close the invalid message then asks for is not sent twice (it raised)."""
    frames = _frame(0x81, b"\xff") + _frame(0x88, b"\x03\xe8")
    seen, (_, closed_frame), _ = _run([frames], direct=False, limit=1_000)
    assert seen == [("lost", 1007)]
    assert closed_frame
