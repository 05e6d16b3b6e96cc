"""The heartbeat (PROTOCOL.md section 7) of every connection on a node, kept by one timer.

Each connection is pinged `ping_interval_ms` after it connected or last answered, and
closed with 4009 if its pong is `pong_timeout_ms` late. Every connection waits the same
interval and the same timeout, so connections queued in the order they became due stay in
deadline order: one sweep pings those due and closes those overdue, at most a fiftieth of
the shorter of the two late.

Before, each connection had a pair of timers per ping (one to ping, one for the pong, made
and cancelled each time) and woke the event loop once per ping. A sweep pings tens of
connections at once with the same frame, built once, and their pongs come back together:
with 10,000 idle connections the node's CPU fell by about 40% (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from typing import Protocol

from apix.realtime.transport import text_frame

__all__ = ["Heartbeat", "Pinged"]


class Pinged(Protocol):
    """A connection the heartbeat keeps."""

    def ping(self, ts: int, frame: bytes) -> bool:
        """Send the ping ``frame`` (`{"op":"ping","ts":ts}`, framed); False if the connection
        is gone."""
        ...

    def pong_overdue(self, ts: int) -> None:
        """The pong for ``ts`` is late: close unless it came."""
        ...


class Heartbeat:
    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.late_s = min(interval_s, timeout_s) / 50
        self._due: deque[tuple[float, weakref.ref[Pinged]]] = deque()  # next ping
        self._waiting: deque[tuple[float, weakref.ref[Pinged], int]] = deque()  # its pong
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time the timer fires

    def schedule(self, connection: Pinged) -> None:
        """Ping ``connection`` an interval from now (it connected, or answered a ping)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval_s
        # A weak reference: a connection that is gone before its ping is not kept.
        self._due.append((due, weakref.ref(connection)))
        # The timer may be set for a pong deadline further away (a timeout longer than the
        # interval); on a busy node it is due within `late_s`, and stays.
        if self._timer is None or due < self._timer_at - self.late_s:
            self._arm(loop, due)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._waiting.clear()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        # uvloop's clock counts whole milliseconds: the timer may fire a hair before the
        # deadline it was armed for, which is due all the same.
        now = max(loop.time(), self._timer_at)
        self._timer = None
        due, waiting = self._due, self._waiting
        try:
            if due and due[0][0] <= now:
                ts = int(time.time() * 1000)
                frame = text_frame(b'{"op":"ping","ts":%d}' % ts)
                deadline = now + self.timeout_s
                while due and due[0][0] <= now:
                    ref = due.popleft()[1]
                    connection = ref()
                    if connection is not None and connection.ping(ts, frame):
                        waiting.append((deadline, ref, ts))
            while waiting and waiting[0][0] <= now:
                _, ref, ts = waiting.popleft()
                connection = ref()
                if connection is not None:
                    connection.pong_overdue(ts)
        finally:  # even if one connection failed: the others keep their heartbeat
            deadlines = [queue[0][0] for queue in (due, waiting) if queue]
            if deadlines:
                self._arm(loop, max(min(deadlines), now + self.late_s))

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._sweep)
        self._timer_at = at
