"""`ApixClient`: one WebSocket to the gateway (PROTOCOL.md), kept alive across drops.

A supervisor task owns the socket: it reads frames, answers the server's pings, refreshes
the token before it expires, and on a drop reconnects with exponential backoff and full
jitter, then resubscribes every subscription from its last position (``since``) so that
iterators continue with no gap and no duplicate. The SDK does not use the server's session
``resume`` or ``ack`` subscriptions (both served; see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Final, Literal

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from apix.client._errors import (
    ApixError,
    BadRequest,
    Conflict,
    ConnectionClosed,
    ConnectionLost,
    Forbidden,
    InternalError,
    RateLimited,
    Unauthorized,
    error_from,
)
from apix.client._models import (
    ConnectionInfo,
    Event,
    History,
    Position,
    PresenceMember,
    PublishResult,
)
from apix.client._subscription import OnUnrecovered, Subscription

log = logging.getLogger("apix.client")

TokenProvider = Callable[[], str | Awaitable[str]]
ClientType = Literal["WEB_APP", "MOBILE_APP", "SDK_WIDGET", "API_CLIENT", "INTERNAL_SERVICE"]
State = Literal["idle", "connecting", "connected", "reconnecting", "closed"]
ReplyHook = Callable[[dict[str, Any]], None]

SUBPROTOCOL: Final = Subprotocol("apix.v1")

# PROTOCOL.md section 9: codes after which reconnecting cannot help.
NO_RECONNECT: Final = frozenset({4000, 4001, 4010, 1009})
TOKEN_EXPIRED: Final = 4003
SHUTTING_DOWN: Final = 4500  # reconnect at once: a load balancer sends us to another node

# The server pings every `ping_interval_ms` and waits 10 s for the pong; hearing nothing for
# that long plus this slack means the socket is dead even if TCP has not noticed yet.
_HEARTBEAT_SLACK_S: Final = 10.0
# A connection that lived this long resets the backoff; one that drops sooner (a server
# that accepts and then rate limits us) keeps backing off further.
_STABLE_AFTER_S: Final = 5.0
# A cached token this close to its expiry is not worth presenting again.
_TOKEN_STALE_S: Final = 5.0
_RESUBSCRIBE_ATTEMPTS: Final = 5

_jitter = random.Random()  # noqa: S311 - backoff jitter, not a secret


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Full jitter: uniform in [0, min(maximum, initial * 2**attempt)]."""
    return _jitter.uniform(0.0, min(maximum, initial * 2 ** min(attempt, 32)))


def _encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


class ApixClient:
    """An asyncio client of the APIX gateway.

    ``token`` is a string (access token or API key) or a token provider: a function, sync or
    async, returning a fresh token. With a provider the client refreshes the token before
    it expires and reconnects after 4003; with a string it cannot, and 4003 ends it.

    Use it as ``async with ApixClient(url, token=...) as client:``; the first connection
    fails fast (`ApixError` subclasses for error replies, `ConnectionClosed` when the
    gateway cannot be reached), later drops are healed in the background.
    """

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        client_type: ClientType = "API_CLIENT",
        name: str | None = None,
        version: str | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        request_timeout: float = 10.0,
        open_timeout: float = 10.0,
        refresh_margin: float = 60.0,
        websocket_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        if isinstance(token, str):
            self._token: str | None = token
            self._provider: TokenProvider | None = None
        else:
            self._token, self._provider = None, token
        client: dict[str, Any] = {"type": client_type}
        if name is not None:
            client["name"] = name
        if version is not None:
            client["version"] = version
        self._client_info = client
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.refresh_margin = refresh_margin
        self._ws_options = dict(websocket_options or {})

        self._state: State = "idle"
        self._ws: ClientConnection | None = None
        self._info: ConnectionInfo | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], ReplyHook | None]] = {}
        self._subs: dict[str, Subscription] = {}
        self._ready = asyncio.Event()  # connected, and every subscription restored
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._disconnect: dict[str, Any] | None = None  # the server's `disconnect` frame
        self._attempt = 0
        self._closing = False
        self._error: ApixError | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def connection(self) -> ConnectionInfo | None:
        """The current (or last) connection's `connection.established` result."""
        return self._info

    @property
    def error(self) -> ApixError | None:
        """Why the client closed, when it was not closed by the application."""
        return self._error

    async def __aenter__(self) -> ApixClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> ConnectionInfo:
        """Open the connection and wait for `connection.established`."""
        if self._state != "idle":
            raise RuntimeError(f"the client is {self._state}; make a new one to connect again")
        self._state = "connecting"
        try:
            ws, info = await self._open(fresh_token=True)
        except websockets.ConnectionClosed as exc:
            self._state = "closed"
            if exc.rcvd is not None:
                raise ConnectionClosed(exc.rcvd.code, exc.rcvd.reason) from exc
            raise ConnectionClosed(None, "the gateway closed the connection") from exc
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            self._state = "closed"
            raise ConnectionClosed(None, f"cannot connect to {self.url}: {exc}") from exc
        except BaseException:
            self._state = "closed"
            raise
        self._ws, self._state = ws, "connected"
        self._ready.set()
        self._supervisor = asyncio.create_task(self._supervise(ws), name="apix-client")
        return info

    async def close(self) -> None:
        """Close the connection; iterators end, pending commands fail with `ConnectionClosed`."""
        self._closing = True
        ws = self._ws
        self._finish(None)
        tasks = [t for t in (self._supervisor, self._refresher, *self._background) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    # --- commands -----------------------------------------------------------------------

    async def subscribe(
        self,
        channel: str,
        *,
        since: Position | None = None,
        last: int = 0,
        types: Sequence[str] | None = None,
        presence: bool = False,
        on_unrecovered: OnUnrecovered | None = None,
    ) -> Subscription:
        """Subscribe to ``channel``; iterate the returned `Subscription` for its events.

        ``since`` replays every event after that position, ``last`` the last N events;
        ``types`` are glob patterns on event types; ``presence`` adds join/leave events.
        ``on_unrecovered(sub)`` is called (sync or async) when a position could not be
        honoured (``sub.recovered`` is False): events were lost, reload your state.
        """
        if channel in self._subs:
            raise Conflict(message=f"already subscribed to {channel}")
        sub = Subscription(
            self,
            channel,
            since=since,
            last=last,
            types=types,
            presence=presence,
            on_unrecovered=on_unrecovered,
        )
        self._subs[channel] = sub
        try:
            while True:
                try:
                    await self._subscribe(sub, wait_ready=True)
                    return sub
                except ConnectionLost:
                    # Dropped before the reply: the new connection knows nothing of it.
                    continue
        except BaseException:
            if self._subs.get(sub.channel) is sub:
                del self._subs[sub.channel]
            sub._fail(None)
            raise

    async def publish(
        self, channel: str, type: str, data: Any = None, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Publish an event; returns its offset, epoch and id."""
        fields: dict[str, Any] = {"channel": channel, "type": type, "data": data}
        if idempotency_key is not None:
            fields["idempotency_key"] = idempotency_key
        return PublishResult.from_wire(await self._request("publish", fields))

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> History:
        """Events kept for replay: after ``since``, or the newest ``limit``."""
        fields: dict[str, Any] = {"channel": channel, "limit": limit, "reverse": reverse}
        if since is not None:
            fields["since"] = since.to_wire()
        return History.from_wire(await self._request("history", fields))

    async def presence(self, channel: str) -> list[PresenceMember]:
        """Connections subscribed to ``channel`` with ``presence=True``."""
        result = await self._request("presence", {"channel": channel})
        return [PresenceMember.from_wire(c) for c in result.get("clients", [])]

    async def ping(self) -> float:
        """Round trip to the gateway, in seconds."""
        started = time.monotonic()
        await self._request("ping", {})
        return time.monotonic() - started

    # --- internals: requests ------------------------------------------------------------

    async def _request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        hook: ReplyHook | None = None,
        wait_ready: bool = True,
    ) -> dict[str, Any]:
        async with asyncio.timeout(self.request_timeout):
            if wait_ready:
                await self._wait_ready()
            self._raise_if_closed()
            ws = self._ws
            if ws is None:
                raise ConnectionLost(message="not connected")
            command_id = next(self._ids)
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[command_id] = (future, hook)
            try:
                try:
                    await ws.send(_encode({"op": op, "id": command_id, **fields}))
                except websockets.ConnectionClosed as exc:
                    if self._ws is ws and self._state != "closed":
                        # Dead before the reader noticed: later commands wait for the next
                        # connection instead of failing on this one in a loop.
                        self._ready.clear()
                    raise ConnectionLost(message="the connection dropped") from exc
                return await future
            finally:
                self._pending.pop(command_id, None)

    async def _wait_ready(self) -> None:
        while not self._ready.is_set():
            self._raise_if_closed()
            await self._ready.wait()

    def _raise_if_closed(self) -> None:
        if self._state == "closed":
            raise self._error or ConnectionClosed(None, "the client is closed")
        if self._state == "idle":
            raise RuntimeError("connect first: `async with ApixClient(...)` or `connect()`")

    async def _subscribe(self, sub: Subscription, *, wait_ready: bool) -> None:
        requested = sub.channel

        def added(result: dict[str, Any]) -> None:
            # Runs in the reader, before the replayed events that follow the reply.
            if sub._done:  # the caller gave up (timeout, cancel): undo it on the server
                self._spawn(self._unsubscribe_remote(str(result.get("channel", requested))))
                return
            sub._added(result)
            if sub.channel != requested and self._subs.get(requested) is sub:
                del self._subs[requested]
                self._subs[sub.channel] = sub

        await self._request("subscribe", sub._command(), hook=added, wait_ready=wait_ready)
        if not sub._done and not sub.recovered:
            # In its own task: the callback may use the client, which waits for us.
            self._spawn(sub._notify_unrecovered())

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        confirmed = sub._confirmed
        sub._fail(None)
        if confirmed and self._ws is not None:
            await self._unsubscribe_remote(sub.channel)

    async def _unsubscribe_remote(self, channel: str) -> None:
        # The connection may be gone, or the server may have dropped it already: either
        # way the subscription is over, which is what the caller wants.
        with contextlib.suppress(ApixError, TimeoutError):
            await self._request("unsubscribe", {"channel": channel}, wait_ready=False)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- internals: the connection ------------------------------------------------------

    async def _token_for_connect(self, *, fresh: bool) -> str:
        if self._provider is None:
            assert self._token is not None  # noqa: S101 - set from the string given
            return self._token
        expires = self._info.token_expires_at if self._info is not None else None
        stale = expires is not None and expires / 1000 - time.time() < _TOKEN_STALE_S
        if fresh or stale or self._token is None:
            self._token = await self._fetch_token()
        return self._token

    async def _fetch_token(self) -> str:
        assert self._provider is not None  # noqa: S101 - callers check
        value = self._provider()
        if inspect.isawaitable(value):
            value = await value
        return str(value)

    async def _open(self, *, fresh_token: bool) -> tuple[ClientConnection, ConnectionInfo]:
        """Open a socket and send `connect`; raise the typed error of an error reply."""
        token = await self._token_for_connect(fresh=fresh_token)
        options: dict[str, Any] = {
            "subprotocols": [SUBPROTOCOL],
            "open_timeout": self.open_timeout,
            # The protocol's own heartbeat (server ping, our pong) keeps the socket alive.
            "ping_interval": None,
            # History and replays may be large; the gateway is trusted to bound them.
            "max_size": None,
            "close_timeout": 2,
            **self._ws_options,
        }
        ws = await ws_connect(self.url, **options)
        try:
            async with asyncio.timeout(self.open_timeout):
                await ws.send(
                    _encode({"op": "connect", "id": 0, "token": token, "client": self._client_info})
                )
                frame = orjson.loads(await ws.recv())
            if not isinstance(frame, dict) or frame.get("op") != "reply":
                raise InternalError(message="the gateway did not answer connect")
            if not frame.get("ok"):
                raise error_from(frame.get("error"))
            info = ConnectionInfo.from_wire(frame["result"])
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        self._info = info
        return ws, info

    async def _supervise(self, ws: ClientConnection) -> None:
        try:
            await self._run(ws)
        except Exception as exc:
            # A bug must not leave the application waiting on a client that is gone.
            log.exception("apix: the client failed")
            self._finish(InternalError(message=f"the client failed: {exc!r}"))

    async def _run(self, ws: ClientConnection) -> None:
        """Run connections one after another until the client is closed or must stop."""
        loop = asyncio.get_running_loop()
        restore = False
        while True:
            started = loop.time()
            code, reason = await self._session(ws, restore=restore)
            if self._closing or self._state == "closed":
                return
            if loop.time() - started >= _STABLE_AFTER_S:
                self._attempt = 0
            hint = self._disconnect or {}
            if code is None and hint.get("code") is not None:
                code = int(hint["code"])
            log.info("apix connection closed (%s %s)", code, reason)
            if not self.reconnect or code in NO_RECONNECT or hint.get("reconnect") is False:
                self._finish(ConnectionClosed(code, reason))
                return
            fresh = code == TOKEN_EXPIRED
            if fresh and self._provider is None:
                self._finish(ConnectionClosed(code, reason, code="token_expired"))
                return
            self._state = "reconnecting"
            reopened = await self._reconnect(at_once=code == SHUTTING_DOWN, fresh_token=fresh)
            if reopened is None:
                return
            ws, restore = reopened, True

    async def _reconnect(self, *, at_once: bool, fresh_token: bool) -> ClientConnection | None:
        first = True
        while True:
            if not (at_once and first):
                await asyncio.sleep(
                    backoff_delay(self._attempt, self.backoff_initial, self.backoff_max)
                )
                self._attempt += 1
            first = False
            try:
                ws, _ = await self._open(fresh_token=fresh_token)
            except (Unauthorized, Forbidden, BadRequest) as exc:
                if self._provider is not None and not fresh_token:
                    # The cached token may be expired or revoked: one more try with a new one.
                    fresh_token = True
                    continue
                # The credential or the request is refused: retrying cannot fix it.
                self._finish(exc)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Network errors, handshake refusals (a node shutting down answers 403),
                # rate limits, internal errors, a failing token provider: try again.
                log.info("apix reconnect failed (%s); retrying", exc)
            else:
                return ws

    async def _session(self, ws: ClientConnection, *, restore: bool) -> tuple[int | None, str]:
        """Serve one socket until it closes; return its close code and reason."""
        self._ws = ws
        self._disconnect = None
        reader = asyncio.create_task(self._read(ws), name="apix-client-reader")
        try:
            if restore:
                await self._restore()
            self._state = "connected"
            self._ready.set()
            if self._provider is not None and self._refresher is None:
                self._refresher = asyncio.create_task(self._refresh_loop())
            return await reader
        except ConnectionLost:
            return await reader
        finally:
            reader.cancel()
            if self._state != "closed":
                self._ready.clear()
            if self._refresher is not None:
                self._refresher.cancel()
                self._refresher = None
            self._ws = None
            self._fail_pending(ConnectionLost(message="the connection dropped"))

    async def _restore(self) -> None:
        """Resubscribe every subscription from its last position, in parallel."""
        subs = [s for s in self._subs.values() if s._confirmed]
        outcomes = await asyncio.gather(
            *(self._resubscribe(s) for s in subs), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, ConnectionLost):
                raise outcome
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome

    async def _resubscribe(self, sub: Subscription) -> None:
        for attempt in itertools.count():
            try:
                await self._subscribe(sub, wait_ready=False)
                return
            except ConnectionLost:
                raise
            except (ApixError, TimeoutError) as exc:
                transient = isinstance(exc, TimeoutError | InternalError | RateLimited)
                if not transient or attempt + 1 >= _RESUBSCRIBE_ATTEMPTS:
                    # Permissions changed, or the server keeps refusing: end this one only.
                    if self._subs.get(sub.channel) is sub:
                        del self._subs[sub.channel]
                    sub._fail(exc if isinstance(exc, ApixError) else ConnectionLost())
                    return
                await asyncio.sleep(backoff_delay(attempt + 1, self.backoff_initial, 5.0))

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str]:
        info = self._info
        interval = (info.ping_interval_ms if info else 25_000) / 1000
        try:
            while True:
                async with asyncio.timeout(interval + _HEARTBEAT_SLACK_S):
                    raw = await ws.recv()
                try:
                    await self._handle(ws, raw)
                except Exception:
                    log.exception("apix: could not handle a frame")
        except TimeoutError:
            log.warning("apix: no heartbeat from the gateway; reconnecting")
            ws.transport.abort()
            return None, "heartbeat timeout"
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None:
                return exc.rcvd.code, exc.rcvd.reason
            return None, "connection lost"

    async def _handle(self, ws: ClientConnection, raw: str | bytes) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("apix: ignoring a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        op = frame.get("op")
        if op == "event":
            sub = self._subs.get(str(frame.get("channel")))
            if sub is not None:
                sub._feed(Event.from_wire(frame))
        elif op == "reply":
            self._reply(frame)
        elif op == "ping":
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(_encode({"op": "pong", "ts": frame.get("ts")}))
        elif op == "disconnect":
            self._disconnect = frame

    def _reply(self, frame: dict[str, Any]) -> None:
        command_id = frame.get("id")
        entry = self._pending.pop(command_id, None) if isinstance(command_id, int) else None
        if entry is None:
            if not frame.get("ok"):
                log.warning("apix: error reply to no command: %s", frame.get("error"))
            return
        future, hook = entry
        if frame.get("ok"):
            result = frame.get("result") or {}
            if hook is not None:
                hook(result)
            if not future.done():
                future.set_result(result)
        elif not future.done():
            future.set_exception(error_from(frame.get("error")))

    def _fail_pending(self, error: ApixError) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)

    def _finish(self, error: ApixError | None) -> None:
        """Close for good: end every iterator (with ``error``) and fail pending commands."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._error = error
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub._fail(error)
        self._fail_pending(error or ConnectionClosed(None, "the client is closed"))
        self._ready.set()  # wake waiting commands: they see the state and raise

    async def _refresh_loop(self) -> None:
        """Send `refresh` with a fresh token ahead of expiry: the margin, or half the time
        left when that is shorter."""
        while True:
            info = self._info
            if info is None or info.token_expires_at is None:
                return
            remaining = info.token_expires_at / 1000 - time.time()
            await asyncio.sleep(max(0.0, remaining - min(self.refresh_margin, remaining / 2)))
            try:
                token = await self._fetch_token()
                result = await self._request("refresh", {"token": token}, wait_ready=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The server closes with 4003 at expiry; reconnecting fetches a new token.
                log.warning("apix: token refresh failed: %s", exc)
                return
            self._token = token
            expires = result.get("token_expires_at")
            self._info = replace(info, token_expires_at=None if expires is None else int(expires))
            if expires is not None and int(expires) <= info.token_expires_at:
                return  # the provider has nothing fresher: asking again would spin
