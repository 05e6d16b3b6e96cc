"""Fast JSON (orjson) for hot paths and responses."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi.responses import JSONResponse


def _default(value: Any) -> Any:
    # UUID subclasses (asyncpg's) and other str-able ids; anything else is a bug to surface.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)


loads = orjson.loads


class ORJSONResponse(JSONResponse):
    """A JSON response rendered by orjson (UUIDs, datetimes and dataclasses included)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
