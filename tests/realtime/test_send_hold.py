"""A connection's send queue while the hub holds writes (`hold_writes`): the frames a batch
has for one socket leave in one write, in order, never ahead of what was sent before them
or behind what is sent after, and a socket's trouble stays its own.

The socket here stands in for the client's end of the TCP connection: it records each
write the queue makes (a system call each on a real socket), and can refuse or fail them.
"""

from __future__ import annotations

import pytest

from apix.realtime.connection import SendQueue, hold_writes, release_writes
from apix.realtime.transport import text_frame


class Client:
    """What `SendQueue` writes to, one entry per write."""

    def __init__(self, *, buffered_after_write: int = 0, fails: bool = False) -> None:
        self.writes: list[bytes] = []
        self.open = True
        self.paused = False
        self.buffered_after_write = buffered_after_write  # > 0: a write makes it pause
        self.fails = fails

    def cap_write_buffer(self, limit: int) -> None:
        pass

    def writable(self) -> bool:
        return self.open and not self.paused

    def write_frame(self, frame: bytes) -> int:
        if not self.writable():
            return -1
        if self.fails:
            raise OSError("the transport is broken")
        self.writes.append(frame)
        self.paused = self.buffered_after_write > 0
        return self.buffered_after_write

    async def send_text(self, text: str) -> None:
        self.writes.append(text_frame(text.encode()))

    def close(self, code: int, reason: str = "") -> None:
        self.open = False

    def abort(self) -> None:
        self.open = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _queue(client: Client, limit: int = 1 << 20) -> tuple[SendQueue, list[list[str]]]:
    overflows: list[list[str]] = []
    queue = SendQueue(limit, overflows.append, direct=client)  # type: ignore[arg-type]
    return queue, overflows


def _event(n: int, pad: int = 0) -> tuple[str, bytes]:
    frame = f'{{"op":"event","channel":"room:a","offset":"1-{n}","data":"{"x" * pad}"}}'
    return frame, text_frame(frame.encode())


def _frames(client: Client) -> bytes:
    return b"".join(client.writes)


async def test_held_frames_leave_in_one_write_in_order() -> None:
    client = Client()
    queue, _ = _queue(client)
    events = [_event(n) for n in range(5)]
    hold_writes()
    for frame, wire in events:
        queue.push(frame, wire=wire)
    assert client.writes == []
    assert release_writes() == 4  # five frames, one write
    assert client.writes == [b"".join(wire for _, wire in events)]


async def test_without_a_hold_each_frame_is_a_write() -> None:
    client = Client()
    queue, _ = _queue(client)
    events = [_event(n) for n in range(3)]
    for frame, wire in events:
        queue.push(frame, wire=wire)
    assert client.writes == [wire for _, wire in events]


async def test_a_reply_sent_mid_batch_goes_after_the_held_events() -> None:
    client = Client()
    queue, _ = _queue(client)
    queue.start(client.send_text)
    (first, first_wire), (second, second_wire) = _event(1), _event(2)
    hold_writes()
    queue.push(first, wire=first_wire)
    queue.push_unbounded('{"op":"reply","id":7,"ok":true}')
    queue.push(second, wire=second_wire)
    release_writes()
    reply = text_frame(b'{"op":"reply","id":7,"ok":true}')
    assert _frames(client) == first_wire + reply + second_wire


async def test_a_queue_closed_mid_batch_sends_what_it_held_first() -> None:
    client = Client()
    queue, _ = _queue(client)
    frame, wire = _event(1)
    hold_writes()
    queue.push(frame, wire=wire)
    queue.close()  # a kick: the events already handed to it went before the close frame
    assert client.writes == [wire]
    assert release_writes() == 0
    assert client.writes == [wire]


async def test_held_bytes_go_out_every_16_kib() -> None:
    client = Client()
    queue, _ = _queue(client)
    events = [_event(n, pad=3000) for n in range(20)]  # about 3 KiB each
    hold_writes()
    for frame, wire in events:
        queue.push(frame, wire=wire)
    release_writes()
    assert _frames(client) == b"".join(wire for _, wire in events)
    assert 4 <= len(client.writes) < 20
    assert all(len(write) < 16 * 1024 + 3100 for write in client.writes)


async def test_a_joined_write_that_overflows_closes_that_queue_alone() -> None:
    slow, fast = Client(buffered_after_write=70_000), Client()
    slow_queue, slow_overflows = _queue(slow, limit=65_536)
    fast_queue, fast_overflows = _queue(fast, limit=65_536)
    hold_writes()
    for n in range(3):
        frame, wire = _event(n)
        slow_queue.push(frame, wire=wire)
        fast_queue.push(frame, wire=wire)
    release_writes()
    assert slow_overflows == [[]]  # 4011; what was written is the client's to read
    assert slow_queue.closed
    assert fast_overflows == []
    assert not fast_queue.closed
    assert len(fast.writes) == 1


async def test_a_failing_socket_does_not_keep_the_others_from_their_frames(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    broken, fine = Client(fails=True), Client()
    broken_queue, _ = _queue(broken)
    fine_queue, _ = _queue(fine)
    frame, wire = _event(1)
    hold_writes()
    broken_queue.push(frame, wire=wire)
    fine_queue.push(frame, wire=wire)
    release_writes()
    assert fine.writes == [wire]
    # Logged through logging once the app has set it up, else printed by structlog.
    printed = capsys.readouterr()
    assert "a held write failed" in caplog.text + printed.out + printed.err
    later, later_wire = _event(2)
    hold_writes()  # nothing stale is left held
    fine_queue.push(later, wire=later_wire)
    release_writes()
    assert fine.writes == [wire, later_wire]
