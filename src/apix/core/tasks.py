"""Background loops that stop when asked, without relying on task cancellation.

redis-py can swallow a cancellation that lands in the middle of a command, so a loop
cancelled that way may keep running; these loops check a stop event between rounds
and are cancelled only as a last resort.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from apix.core.logging import get_logger

log = get_logger(__name__)


async def stop_task(task: asyncio.Task[None], grace_s: float, *, interrupt: bool = False) -> None:
    """Wait a moment for a loop already told to stop (a flag it checks between rounds),
    then cancel it: the last resort, for the reason above.

    ``interrupt``: the loop is idle in a read that loses nothing when cancelled (a pub/sub
    poll), so it is cancelled at once instead of being waited out. Should redis-py swallow
    that cancellation, the read still returns and the loop sees its flag.

    Only the caller's own cancellation propagates (`asyncio.wait` raises nothing else), so
    a stop made during a cancelled caller's clean-up still completes.
    """
    if interrupt:
        task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
    if done and not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task failed", task=task.get_name(), exc_info=error)


class Periodic:
    """Run ``step`` every ``interval`` seconds until `stop`; errors are logged and retried."""

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval = interval
        self.step = step
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        await stop_task(task, grace_s)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            if self._stop.is_set():
                return
            try:
                await self.step()
            except Exception:
                log.exception("background step failed; retrying", task=self.name)
