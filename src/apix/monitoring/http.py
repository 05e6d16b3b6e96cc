"""HTTP latency per route: a pure ASGI middleware that times each request.

The route is the matched template (`/api/v1/apix/channels/{channel}/events`), read from the
scope once routing is done, so label sets stay bounded; unmatched paths count as
`unmatched`. The time goes to the node's histograms and to Prometheus.
"""

from __future__ import annotations

import time

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"


class HttpLatencyMiddleware:
    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self.state = state  # the app's state: `monitoring` is there once the lifespan ran

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        runtime = getattr(self.state, "monitoring", None)
        if runtime is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            runtime.http_request(template, scope["method"], status, time.perf_counter() - started)
