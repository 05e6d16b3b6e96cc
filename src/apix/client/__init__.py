"""The Python client of the APIX real-time gateway: `ApixClient` over one WebSocket.

It reconnects on its own and resubscribes from each subscription's last position, so an
``async for event in sub`` loop sees every event once, in order. See docs/realtime.md.
"""

from apix.client._client import ApixClient, ClientType, State, TokenProvider
from apix.client._errors import (
    ApixError,
    BadRequest,
    Conflict,
    ConnectionClosed,
    ConnectionLost,
    Forbidden,
    InternalError,
    NotFound,
    RateLimited,
    TokenExpired,
    TooLarge,
    Unauthorized,
    Unrecoverable,
)
from apix.client._models import (
    ConnectionInfo,
    Event,
    History,
    Position,
    PresenceMember,
    PublishResult,
)
from apix.client._subscription import Subscription

__all__ = [
    "ApixClient",
    "ApixError",
    "BadRequest",
    "ClientType",
    "Conflict",
    "ConnectionClosed",
    "ConnectionInfo",
    "ConnectionLost",
    "Event",
    "Forbidden",
    "History",
    "InternalError",
    "NotFound",
    "Position",
    "PresenceMember",
    "PublishResult",
    "RateLimited",
    "State",
    "Subscription",
    "TokenExpired",
    "TokenProvider",
    "TooLarge",
    "Unauthorized",
    "Unrecoverable",
]
