"""HTTP latency per route: an observer the request-context middleware tells of each request.

The route is the matched template (`/api/v1/apix/channels/{channel}/events`), read from the
scope once routing is done, so label sets stay bounded; requests no route took (unknown
paths, and bodies refused as too large before routing) count as `unmatched`, and methods
outside the usual seven as `OTHER`. The time goes
to the node's histograms and to Prometheus.
"""

from __future__ import annotations

from starlette.datastructures import State
from starlette.types import Scope

from apix.core.middleware import OnResponse

UNMATCHED = "unmatched"
# Methods a label may name; any other counts as OTHER, so clients cannot add label sets.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def latency_observer(state: State) -> OnResponse:
    """Records each request on the app's monitoring runtime, once the lifespan made it."""

    def observe(scope: Scope, status: int, seconds: float) -> None:
        runtime = getattr(state, "monitoring", None)
        if runtime is None:
            return
        template = getattr(scope.get("route"), "path", None) or UNMATCHED
        method = scope["method"]
        runtime.http_request(template, method if method in METHODS else "OTHER", status, seconds)

    return observe
