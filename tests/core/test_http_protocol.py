"""`ApixHttpProtocol`: uvicorn's HTTP protocol with each response's head and first body
bytes in one write. Real uvicorns on loopback sockets, driven by raw HTTP/1.1 clients; the
answers are compared byte for byte with uvicorn's own httptools protocol."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from apix.core.http_protocol import HTTP_PROTOCOL


@dataclass
class Plan:
    """What the app answers to `/plan/<n>`."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=lambda: [b"{}"])
    content_length: bool = True
    fail_after_start: bool = False


PLANS: dict[int, Plan] = {}
_ids = itertools.count()


async def app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    if path == "/echo":  # reads the body first: `Expect: 100-continue` is answered then
        body = await Request(scope, receive).body()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if path == "/slow-stream":  # a stream whose first chunk takes its time
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
        return
    if path == "/addresses":  # what the app is told about the two ends
        body = repr((scope["client"], scope["server"], scope["scheme"])).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    plan = PLANS[int(path.rsplit("/", 1)[1])]
    headers = list(plan.headers)
    if plan.content_length:
        headers.append((b"content-length", str(sum(map(len, plan.chunks))).encode()))
    await send({"type": "http.response.start", "status": plan.status, "headers": headers})
    if plan.fail_after_start:
        raise RuntimeError("the app failed after starting its response")
    for i, chunk in enumerate(plan.chunks):
        more = i < len(plan.chunks) - 1
        await send({"type": "http.response.body", "body": chunk, "more_body": more})


class Server:
    """uvicorn in a thread of its own, on a socket bound to a free loopback port."""

    def __init__(self, http: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=http,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,  # answers compared byte for byte
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


@pytest.fixture(scope="module")
def uvicorns() -> Iterator[tuple[Server, Server]]:
    """Ours, and uvicorn's own httptools protocol to compare with."""
    with Server(HTTP_PROTOCOL) as ours, Server("httptools") as stock:
        yield ours, stock


def plan(p: Plan) -> str:
    n = next(_ids)
    PLANS[n] = p
    return f"/plan/{n}"


def exchange(server: Server, request: bytes) -> bytes:
    """Send `request` and read until the server closes the connection."""
    with server.connect() as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()


header_names = st.sampled_from([b"content-type", b"x-request-id", b"cache-control", b"x-a"])
header_values = st.binary(min_size=0, max_size=40).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)
)
plans = st.builds(
    Plan,
    status=st.sampled_from([200, 201, 202, 400, 404, 409, 413, 422, 500, 503]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=4),
    chunks=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    content_length=st.booleans(),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(p=plans, method=st.sampled_from(["GET", "POST", "HEAD"]))
def test_answers_are_byte_for_byte_uvicorns(
    uvicorns: tuple[Server, Server], p: Plan, method: str
) -> None:
    ours, stock = uvicorns
    path = plan(p)
    answer = exchange(ours, get(path, method))
    assert answer == exchange(stock, get(path, method))
    assert answer.startswith(b"HTTP/1.1 %d " % p.status)


def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    uvicorns: tuple[Server, Server],
) -> None:
    paths = [plan(Plan(chunks=[f'{{"n": {i}}}'.encode()])) for i in range(3)]
    head = plan(Plan(chunks=[b"never sent"]))
    requests = [f"GET {p} HTTP/1.1\r\nhost: t\r\n\r\n".encode() for p in paths]
    requests.insert(1, f"HEAD {head} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    answers = []
    for server in uvicorns:
        with server.connect() as sock:
            sock.sendall(b"".join(requests))  # pipelined: all four before any answer
            received = b""
            while received.count(b"HTTP/1.1 200 OK") < 4 or not received.endswith(b'{"n": 2}'):
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed early: {received!r}"
                received += chunk
        answers.append(received)
    ours, stock = answers
    assert ours == stock
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in ours.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b'{"n": 0}', b"", b'{"n": 1}', b'{"n": 2}']
    assert b"never sent" not in ours


def test_100_continue_is_written_before_the_body_is_read(uvicorns: tuple[Server, Server]) -> None:
    ours, _ = uvicorns
    with ours.connect() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        received = b""
        while not received.endswith(b"hello"):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


def test_an_app_failing_after_the_head_still_sends_it_then_closes(
    uvicorns: tuple[Server, Server],
) -> None:
    ours, stock = uvicorns
    path = plan(Plan(status=201, chunks=[b"x" * 10], fail_after_start=True))
    request = f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode()  # keep-alive asked for
    answer = exchange(ours, request)  # returns only because the server closed
    assert answer == exchange(stock, request)
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
    assert answer.endswith(b"\r\n\r\n")  # the head, and no body


def test_a_stream_gets_its_head_before_its_first_chunk(uvicorns: tuple[Server, Server]) -> None:
    ours, _ = uvicorns
    with ours.connect() as sock:
        sock.settimeout(0.8)  # the chunk comes after 1 s
        sock.sendall(b"GET /slow-stream HTTP/1.1\r\nhost: t\r\n\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"transfer-encoding: chunked\r\n\r\n")
        sock.settimeout(5)
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
    assert rest == b"4\r\nlate\r\n0\r\n\r\n"


def _data_segments(sock: socket.socket) -> tuple[int, int]:
    """(data segments received, sent) from Linux's `tcp_info` (`tcpi_data_segs_in/out`)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    received, sent = struct.unpack_from("=II", info, 152)
    return received, sent


@pytest.mark.skipif(sys.platform != "linux", reason="counts TCP segments with Linux's tcp_info")
def test_a_response_leaves_in_one_tcp_segment(uvicorns: tuple[Server, Server]) -> None:
    """The point of the protocol; uvicorn's own sends the head and the body apart."""
    segments = {}
    for server in uvicorns:
        path = plan(Plan(headers=[(b"content-type", b"application/json")], chunks=[b'{"a": 1}']))
        with server.connect() as sock:
            before = _data_segments(sock)
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
            received = b""
            while not received.endswith(b'{"a": 1}'):
                received += sock.recv(65536)
            time.sleep(0.05)  # a second segment, if any, has arrived by now
            after = _data_segments(sock)
        assert after[1] - before[1] == 1  # our request: one segment (the offsets are right)
        segments[server] = after[0] - before[0]
    ours, stock = uvicorns
    assert segments[ours] == 1
    assert segments[stock] == 2


def test_the_app_is_told_both_ends_of_the_connection(
    uvicorns: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looked up when the first request begins, not when the connection is made; a second
    request on the same connection is told the same. (At uvicorn's TRACE level, which
    logs them as the connection is made, uvicorn looks them up itself.)"""
    for server, level in itertools.product(uvicorns, [logging.INFO, logging.NOTSET]):
        monkeypatch.setattr(logging.getLogger("uvicorn.error"), "level", level)
        with server.connect() as sock:
            request = b"GET /addresses HTTP/1.1\r\nhost: t\r\n\r\n"
            sock.sendall(request + request[:-2] + b"connection: close\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            client, local = sock.getsockname(), sock.getpeername()
        expected = repr((client, local, "http")).encode()
        assert received.count(expected) == 2, received
