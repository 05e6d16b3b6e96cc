"""Stopping background loops: promptly when they idle in a read, never swallowing the
caller's own cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from apix.app import create_app
from apix.config import Settings
from apix.core.tasks import stop_task


async def test_an_idle_node_stops_in_well_under_its_poll_intervals(settings: Settings) -> None:
    # The revocation watcher polls Redis every second and the hub every 0.2 s; a node told
    # to stop used to wait those polls out (about a second per stop).
    for _ in range(3):
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)  # both readers are now waiting on Redis
            started = time.perf_counter()
        assert time.perf_counter() - started < 0.3


async def test_an_interrupted_task_is_cancelled_at_once() -> None:
    reading = asyncio.Event()

    async def poll() -> None:
        reading.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(poll())
    await reading.wait()
    started = time.perf_counter()
    await stop_task(task, grace_s=5.0, interrupt=True)
    assert task.cancelled()
    assert time.perf_counter() - started < 0.5


async def test_a_loop_that_swallows_the_interruption_still_stops_on_its_flag() -> None:
    stopping = False
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while not stopping:
            rounds += 1
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    stopping = True
    await stop_task(task, grace_s=5.0, interrupt=True)
    assert task.done()
    assert not task.cancelled()
    assert rounds == 1


async def test_the_callers_cancellation_is_not_swallowed() -> None:
    async def stubborn() -> None:
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn())
    stopper = asyncio.create_task(stop_task(task, grace_s=5.0))
    await asyncio.sleep(0.01)  # the stopper waits out the grace
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not task.done()
    task.cancel()
