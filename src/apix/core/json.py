"""Fast JSON (orjson) for hot paths and responses."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


loads = orjson.loads


class ORJSONResponse(JSONResponse):
    """A JSON response rendered by orjson (UUIDs, datetimes and dataclasses included)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
