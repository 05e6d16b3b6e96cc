"""The opening handshake (RFC 6455 section 4.2).

The gateway answers a plain upgrade request itself and hands every other one to
websockets' handshake parser. Both must take and refuse the same requests and agree on
the accept key, the subprotocol and the extensions. The property test holds the gateway's
answer against websockets' own; the wire tests go through a live node.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from apix.core.http_protocol import ApixHttpProtocol
from apix.realtime.transport import _deflate, _plain_upgrade, _select_subprotocol
from tests.conftest import LiveServer
from tests.identity.factories import new_org_admin
from tests.realtime.raw import Stream, hand_command, hand_upgrade

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _expected_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324


def _reference(data: bytes, deflate: bool) -> tuple[Request | None, Response | None, str]:
    """What websockets' server answers: (request, response, extensions as agreed)."""
    server = ServerProtocol(
        extensions=_deflate() if deflate else None, select_subprotocol=_select_subprotocol
    )
    server.receive_data(data)
    events = server.events_received()
    if not events:  # the request did not parse: websockets answers 400
        return None, None, ""
    request = events[0]
    assert isinstance(request, Request)
    response = server.accept(request)
    return request, response, repr(server.extensions)


def _headers(response: bytes) -> tuple[bytes, dict[str, str]]:
    status, *lines = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields


_TOKENS = st.lists(st.sampled_from(["apix.v1", "chat", "x-1", "APIX.V1"]), min_size=1, max_size=3)
# Each header: (a valid value, an invalid or unusual one).
_FIELDS: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "Host": (st.just("127.0.0.1:8000"), st.just("")),
    "Upgrade": (
        st.sampled_from(["websocket", "WebSocket"]),
        st.sampled_from(["h2c", "websocket, h2c", ""]),
    ),
    "Connection": (
        st.sampled_from(["Upgrade", "keep-alive, Upgrade", "upgrade"]),
        st.sampled_from(["close", "", "Upgrade;"]),
    ),
    "Sec-WebSocket-Key": (
        st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode()),
        st.one_of(
            st.binary(min_size=1, max_size=20).map(lambda b: base64.b64encode(b).decode()),
            st.sampled_from(["not base64!", "", "AAAAAAAAAAAAAAAAAAAAAA"]),
        ),
    ),
    "Sec-WebSocket-Version": (st.just("13"), st.sampled_from(["8", "13, 8", ""])),
    "Sec-WebSocket-Protocol": (
        st.one_of(_TOKENS.map(", ".join), _TOKENS.map(",".join)),
        st.sampled_from([" , ,", "a b", "", "chat,"]),
    ),
    "Sec-WebSocket-Extensions": (
        st.sampled_from(
            [
                "permessage-deflate",
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_max_window_bits=10",
                "permessage-deflate; server_no_context_takeover, permessage-deflate",
                "x-unknown, permessage-deflate; client_no_context_takeover",
            ]
        ),
        st.sampled_from(
            ["permessage-deflate; client_max_window_bits=20", "permessage-deflate;;", "", "a b"]
        ),
    ),
    "Origin": (st.sampled_from(["http://a.example", "null"]), st.just("")),
    "Content-Length": (st.just("0"), st.just("5")),
    "Transfer-Encoding": (st.just("chunked"), st.just("identity")),  # never in a handshake
    "User-Agent": (
        st.just("hypothesis/1 (+tests)"),
        st.integers(8170, 8185).map(lambda n: "x" * n),  # around the line limit
    ),
}
_NEEDED = {"Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version"}


@st.composite
def upgrade_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request's bytes as uvicorn passes them on, and whether a header name repeats.

    Mostly well-formed, each part sometimes not, so that both answers are common."""
    method = draw(st.sampled_from(["GET"] * 7 + ["POST"]))
    version = draw(st.sampled_from(["HTTP/1.1"] * 7 + ["HTTP/1.0"]))
    target = draw(st.sampled_from(["/api/v1/apix/ws", "/api/v1/apix/ws?x=1", "/other"]))
    if draw(st.integers(0, 9)) == 0:  # around websockets' limit of 8,192 bytes a line
        target = "/api/v1/apix/ws?q=" + "x" * draw(st.integers(8160, 8185))
    fields: list[tuple[str, str]] = []
    for name, (valid, invalid) in _FIELDS.items():
        odds = 9 if name in _NEEDED else 1 if name == "Transfer-Encoding" else 4
        if draw(st.integers(0, 9)) < odds:
            spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
            well_formed = draw(st.integers(0, 9)) < 9
            fields.append((spelled, draw(valid if well_formed else invalid)))
    repeated = bool(fields) and draw(st.integers(0, 9)) == 0
    if repeated:
        fields.append(draw(st.sampled_from(fields)))
    fields = draw(st.permutations(fields))
    lines = [f"{method} {target} {version}", *(f"{n}: {v}" for n, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), repeated


@settings(max_examples=400, deadline=None)
@given(request=upgrade_requests(), deflate=st.booleans())
def test_the_gateways_answer_agrees_with_websockets(
    request: tuple[bytes, bool], deflate: bool
) -> None:
    data, repeated = request
    plain = _plain_upgrade(data, deflate)
    parsed, reference, extensions = _reference(data, deflate)
    accepted = reference is not None and reference.status_code == 101
    if repeated:  # left to websockets, whatever its answer
        assert plain is None
        return
    # Every request websockets accepts, the gateway accepts, and no other.
    assert (plain is not None) == accepted
    if plain is None:
        return
    assert parsed is not None
    assert reference is not None
    path, origin, response, agreed, rest = plain
    status, fields = _headers(response)
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert response.endswith(b"\r\n\r\n")
    for name in ("Upgrade", "Connection", "Sec-WebSocket-Accept", "Sec-WebSocket-Protocol"):
        assert fields.get(name.lower()) == reference.headers.get(name), name
    assert fields.get("sec-websocket-extensions") == reference.headers.get(
        "Sec-WebSocket-Extensions"
    )
    assert repr(agreed) == extensions
    assert path == parsed.path
    assert origin == parsed.headers.get("Origin")
    assert rest == b""


def test_bytes_after_the_request_are_kept_for_the_frame_parser() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /api/v1/apix/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    plain = _plain_upgrade(request + b"\x81\x80abcd", deflate=False)
    assert plain is not None
    assert plain[4] == b"\x81\x80abcd"
    assert _headers(plain[2])[1]["sec-websocket-accept"] == _expected_accept(key)


# --- on the wire ----------------------------------------------------------------------------


async def _raw_upgrade(port: int, extra: str) -> tuple[bytes, dict[str, str], str, Stream]:
    head, key, stream = await hand_upgrade(port, extra)
    status, fields = _headers(head)
    return status, fields, key, stream


@pytest.mark.parametrize(
    ("extra", "subprotocol"),
    [
        ("", None),
        ("Sec-WebSocket-Protocol: chat, apix.v1\r\n", "apix.v1"),
        # A header given twice: websockets' parser answers, with the same result.
        ("Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: apix.v1\r\n", "apix.v1"),
        ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n", None),
    ],
    ids=["plain", "subprotocol", "header-twice", "deflate"],
)
async def test_an_upgrade_is_answered_by_the_rfc_and_the_socket_serves_commands(
    client: httpx.AsyncClient, live: LiveServer, extra: str, subprotocol: str | None
) -> None:
    admin = await new_org_admin(client)
    status, fields, key, (reader, writer) = await _raw_upgrade(live.port, extra)
    try:
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert fields["sec-websocket-accept"] == _expected_accept(key)
        assert fields.get("sec-websocket-protocol") == subprotocol
        if "deflate" in extra:
            assert fields["sec-websocket-extensions"].startswith("permessage-deflate")
        command = {"op": "connect", "id": 1, "token": admin.access_token}
        reply = await hand_command((reader, writer), {**command, "client": {"type": "API_CLIENT"}})
        assert reply["id"] == 1
        assert reply["ok"], reply
    finally:
        writer.close()


async def test_a_malformed_upgrade_is_refused(live: LiveServer) -> None:
    """Version given twice (and not 13): websockets' parser answers 400."""
    status, _, _, (_, writer) = await _raw_upgrade(live.port, "Sec-WebSocket-Version: 8\r\n")
    writer.close()
    assert status.startswith(b"HTTP/1.1 400 ")


async def test_an_upgrade_with_a_body_is_not_upgraded(live: LiveServer) -> None:
    """A handshake has no body: the connection is closed without an answer."""
    with pytest.raises(asyncio.IncompleteReadError) as closed:
        await _raw_upgrade(live.port, "Content-Length: 5\r\n")
    assert closed.value.partial == b""


async def test_two_origin_headers_are_refused_and_the_node_serves_on(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    extra = "Origin: http://a.example\r\nOrigin: http://b.example\r\n"
    status, _, _, (_, writer) = await _raw_upgrade(live.port, extra)
    writer.close()
    assert status.startswith(b"HTTP/1.1 400 "), status
    admin = await new_org_admin(client)
    status, _, _, (reader, writer) = await _raw_upgrade(live.port, "")
    try:
        assert status == b"HTTP/1.1 101 Switching Protocols"
        command = {"op": "connect", "id": 1, "token": admin.access_token}
        client = {"type": "API_CLIENT"}
        assert (await hand_command((reader, writer), {**command, "client": client}))["ok"]
    finally:
        writer.close()


@pytest.mark.parametrize("pieces", [1, 2], ids=["whole", "in-two-reads"])
async def test_an_upgrade_that_arrives_whole_skips_the_http_parser(
    client: httpx.AsyncClient,
    live: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
    pieces: int,
) -> None:
    """A connection's first read holding a whole plain upgrade goes straight to the
    gateway's protocol; one that arrives in pieces is parsed by uvicorn first, as before.
    Both are answered alike and serve commands."""
    begun: list[object] = []
    original = ApixHttpProtocol.on_message_begin

    def counting(self: ApixHttpProtocol) -> None:
        begun.append(self)
        original(self)

    monkeypatch.setattr(ApixHttpProtocol, "on_message_begin", counting)
    admin = await new_org_admin(client)
    begun.clear()  # the sign-up's own requests
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /api/v1/apix/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        cut = len(request) // pieces
        for start in range(0, len(request), cut):
            writer.write(request[start : start + cut])
            await writer.drain()
            await asyncio.sleep(0.05)  # a read of its own on the server
        status, fields = _headers(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert fields["sec-websocket-accept"] == _expected_accept(key)
        command = {"op": "connect", "id": 1, "token": admin.access_token}
        reply = await hand_command((reader, writer), {**command, "client": {"type": "API_CLIENT"}})
        assert reply["ok"], reply
    finally:
        writer.close()
    assert len(begun) == pieces - 1


async def test_a_command_sent_with_the_upgrade_is_answered(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """Frames in the same read as the request (the client did not wait for the 101) are
    read once the connection is upgraded, not dropped."""
    admin = await new_org_admin(client)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /api/v1/apix/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    command = json.dumps(
        {"op": "connect", "id": 7, "token": admin.access_token, "client": {"type": "API_CLIENT"}}
    ).encode()
    mask = os.urandom(4)
    frame = struct.pack("!BBH", 0x81, 0x80 | 126, len(command)) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(command))
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        writer.write(request + frame)
        status, _ = _headers(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        assert status == b"HTTP/1.1 101 Switching Protocols"
        head = await asyncio.wait_for(reader.readexactly(2), 5)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        reply = json.loads(await asyncio.wait_for(reader.readexactly(size), 5))
        assert reply["id"] == 7
        assert reply["ok"], reply
    finally:
        writer.close()
