"""Request dependencies of the providers domain: its runtime, from the lifespan's resources."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from apix.providers.runtime import ProvidersRuntime


async def _runtime(request: Request) -> ProvidersRuntime:
    state = request.app.state
    return ProvidersRuntime.create(
        state.settings, state.database, state.redis, state.gateway.broker
    )


Runtime = Annotated[ProvidersRuntime, Depends(_runtime)]
