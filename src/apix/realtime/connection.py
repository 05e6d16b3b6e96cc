"""A client connection's send side: a bounded queue drained by one writer task.

The hub only appends to the queue (no await, no task per frame); the writer sends frames in
order. A client that does not read fast enough lets its queue grow past the limit and is
closed with 4011 (slow consumer) so it never slows anyone else down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from apix.core.logging import get_logger

log = get_logger(__name__)

SendText = Callable[[str], Awaitable[None]]
OnOverflow = Callable[[], None]


class DirectWriter(Protocol):
    def write_frame(self, frame: bytes) -> bool: ...

    def buffered(self) -> int: ...


class SendQueue:
    """Frames waiting for one client, bounded in bytes (approximated by string length)."""

    __slots__ = (
        "_frames",
        "_limit",
        "_on_overflow",
        "_pending",
        "_sending",
        "_wakeup",
        "closed",
        "direct",
        "empty",
        "size",
    )

    def __init__(
        self, limit_bytes: int, on_overflow: OnOverflow, direct: DirectWriter | None = None
    ) -> None:
        self._frames: deque[str] = deque()
        self._limit = limit_bytes
        self._on_overflow = on_overflow
        self._wakeup = asyncio.Event()
        self._pending = False
        self.size = 0
        self.closed = False
        self.empty = asyncio.Event()  # set whenever everything queued has been sent
        self.empty.set()
        self._sending = False
        # The fast path: write pre-built frames straight to the socket while nothing is
        # queued or in flight (order is kept: anything queued goes first, by the writer).
        self.direct = direct

    def push(self, frame: str, *, wire: bytes | None = None, priority: int = 1) -> None:
        if self.closed:
            return
        direct = self.direct
        if (
            wire is not None
            and direct is not None
            and not self._frames
            and not self._sending
            and direct.write_frame(wire)
        ):
            if direct.buffered() > self._limit:
                self.closed = True
                self._on_overflow()
            return
        self._frames.append(frame)
        self.size += len(frame)
        if self.size > self._limit:
            self.closed = True
            self._frames.clear()
            self._on_overflow()
            return
        self.empty.clear()
        if not self._pending:
            self._pending = True
            self._wakeup.set()

    def push_unbounded(self, frame: str) -> None:
        """For replies and replays the client asked for: counted, never an overflow."""
        if self.closed:
            return
        self._frames.append(frame)
        self.size += len(frame)
        self.empty.clear()
        if not self._pending:
            self._pending = True
            self._wakeup.set()

    async def drain_into(self, send: SendText) -> None:
        """Send frames in order until closed; the writer task runs this."""
        frames = self._frames
        while not self.closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._pending = False
            while frames and not self.closed:
                frame = frames.popleft()
                self.size -= len(frame)
                self._sending = True
                try:
                    await send(frame)
                finally:
                    self._sending = False
            if not frames:
                self.empty.set()

    def close(self) -> None:
        self.closed = True
        self._frames.clear()
        self._wakeup.set()


async def run_writer(queue: SendQueue, send: SendText) -> None:
    with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
        await queue.drain_into(send)
