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
        assert time.perf_counter() - started < 0.8  # the revocation poll alone is 1 s


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
    assert time.perf_counter() - started < 2  # not the 5 s grace


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


async def test_the_callers_cancellation_propagates_while_it_interrupts() -> None:
    stopping = False

    async def stubborn() -> None:
        while not stopping:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task, grace_s=5.0, interrupt=True))
    await asyncio.sleep(0.2)  # the task swallowed the interruption: the stopper waits
    assert not stopper.done()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not task.done()
    stopping = True
    await asyncio.wait_for(task, 2)


async def test_a_stop_made_in_a_cancelled_callers_clean_up_completes() -> None:
    # A lifespan's `finally` after a cancellation (a test timeout, Ctrl-C): the stops that
    # follow must still close what they own.
    reading = asyncio.Event()
    finished: list[str] = []

    async def poll() -> None:
        reading.set()
        await asyncio.sleep(30)

    async def owner() -> None:
        task = asyncio.create_task(poll())
        try:
            await asyncio.sleep(30)
        finally:
            await reading.wait()
            await stop_task(task, grace_s=5.0, interrupt=True)
            finished.append("stopped")

    running = asyncio.create_task(owner())
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert finished == ["stopped"]


async def test_a_task_that_failed_does_not_fail_the_stop() -> None:
    # Its error is logged; raising it would skip the rest of the node's clean-up.
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken(), name="apix-broken")
    await asyncio.sleep(0)
    await stop_task(task, grace_s=1.0)
    assert isinstance(task.exception(), RuntimeError)
