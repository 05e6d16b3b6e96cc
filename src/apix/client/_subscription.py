"""A channel subscription as the application sees it: an async iterator of events that
survives reconnects, remembering its position so the client can resubscribe with ``since``.

The client's reader feeds it (`_added`, `_feed`, `_fail`); the application only iterates,
reads `position` and `recovered`, and unsubscribes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from apix.client._models import Event, Position

if TYPE_CHECKING:
    from apix.client._client import ApixClient

log = logging.getLogger("apix.client")

OnUnrecovered = Callable[["Subscription"], Awaitable[None] | None]

_END: Final = object()


class Subscription:
    """Events of one channel, in offset order, with no gap and no duplicate across reconnects.

    Iterate with ``async for event in sub``. The iterator ends after `unsubscribe` or
    `ApixClient.close`, and raises `ConnectionClosed` (or the error that ended the
    subscription) when the client cannot continue.
    """

    def __init__(
        self,
        client: ApixClient,
        channel: str,
        *,
        since: Position | None,
        last: int,
        types: Sequence[str] | None,
        presence: bool,
        on_unrecovered: OnUnrecovered | None,
    ) -> None:
        self._client = client
        self.channel = channel
        self.types = list(types) if types else None
        self.presence = presence
        self._since = since
        self._last = last
        self._on_unrecovered = on_unrecovered
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._position = since
        # Events the server replays after a subscribe reply; once they are in, the reply's
        # position (the channel's head) becomes ours, even if a filter skipped the last ones.
        self._replay_left = 0
        self._replay_end: Position | None = None
        self._done = False
        # Confirmed by the server once: from then on the client restores it on every
        # reconnect; before that, `ApixClient.subscribe` retries it itself.
        self._confirmed = False
        self.recovered = True
        self.replayed = 0

    @property
    def position(self) -> Position | None:
        """The last position seen: where a resubscription resumes (``since``)."""
        return self._position

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(_END)
            raise item
        event: Event = item
        return event

    async def unsubscribe(self) -> None:
        """Stop receiving this channel; the iterator ends once queued events are read."""
        await self._client._unsubscribe(self)

    # --- fed by the client ------------------------------------------------------------------

    def _command(self) -> dict[str, Any]:
        """The subscribe command: first ``since``/``last`` as asked, then our position."""
        fields: dict[str, Any] = {"channel": self.channel, "presence": self.presence}
        if self.types:
            fields["filter"] = {"types": self.types}
        if self._position is not None:
            fields["since"] = self._position.to_wire()
        elif self._last:
            fields["last"] = self._last
        return fields

    def _added(self, result: dict[str, Any]) -> None:
        """Apply a `subscription.added` reply (before the replayed events that follow it)."""
        self.channel = str(result.get("channel", self.channel))  # canonical (`user:me`)
        self._confirmed = True
        head = Position.from_wire(result["position"])
        self.recovered = bool(result.get("recovered", True))
        self.replayed = int(result.get("replayed", 0))
        if not self.recovered:
            # The old position means nothing in the stream's new life: start from its head.
            self._position = head
        # Reset even when nothing is replayed: a drop may have cut an earlier replay short.
        self._replay_left = self.replayed
        self._replay_end = head if self.replayed else None
        if not self.replayed:
            self._advance(head)

    def _feed(self, event: Event) -> None:
        position = event.position
        if position is None:  # presence: not kept, no offset
            self._queue.put_nowait(event)
            return
        if self._position is None or self._position.precedes(position):
            self._position = position
            self._queue.put_nowait(event)
        # else: delivered already, before a reconnect
        if self._replay_left:
            self._replay_left -= 1
            if not self._replay_left and self._replay_end is not None:
                self._advance(self._replay_end)

    def _advance(self, position: Position) -> None:
        if self._position is None or self._position.precedes(position):
            self._position = position

    def _fail(self, error: BaseException | None) -> None:
        """End the iterator: with ``error``, or quietly when None."""
        if self._done:
            return
        self._done = True
        self._confirmed = False
        self._queue.put_nowait(_END if error is None else error)

    async def _notify_unrecovered(self) -> None:
        if self._on_unrecovered is None:
            return
        try:
            outcome = self._on_unrecovered(self)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            # The application's callback failed; the subscription itself carries on.
            log.exception("apix: on_unrecovered(%s) failed", self.channel)
