"""Writing the roll-ups of API calls from each node. (Events are counted by the archiver, in
the statement that archives them: `apix.realtime.archive`.)"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from starlette.types import Scope

from apix.analytics.models import ApiMinute
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.infra.database import Database

log = get_logger(__name__)

_FLUSH_S = 10.0


def minute_of(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


class ApiUsage:
    """Counts API-key requests in memory; a node flushes them every few seconds."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[uuid.UUID, uuid.UUID, datetime, bool]] = Counter()
        self._loop: Periodic | None = None

    def hit(self, org_id: uuid.UUID, api_key_id: uuid.UUID, status: int) -> None:
        self._counts[(org_id, api_key_id, minute_of(datetime.now(UTC)), status >= 400)] += 1

    def observe(self, scope: Scope, status: int, _seconds: float) -> None:
        """Counts a request made with an API key (the request-context middleware's observer;
        authentication leaves the key in the scope's state)."""
        api_key = scope["state"].get("api_key")
        if api_key is not None:
            self.hit(api_key[0], api_key[1], status)

    def start(self, database: Database) -> None:
        self._loop = Periodic("apix-api-usage", _FLUSH_S, lambda: self.flush(database))
        self._loop.start()

    async def stop(self, database: Database) -> None:
        if self._loop is not None:
            await self._loop.stop()
        try:
            await self.flush(database)
        except Exception:
            log.warning("api usage: last flush failed", exc_info=True)

    async def flush(self, database: Database) -> None:
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        per_org: dict[uuid.UUID, dict[tuple[uuid.UUID, datetime], list[int]]] = {}
        for (org_id, key_id, minute, failed), n in counts.items():
            entry = per_org.setdefault(org_id, {}).setdefault((key_id, minute), [0, 0])
            entry[0] += n
            entry[1] += n if failed else 0
        try:
            async with database.engine.begin() as conn:
                for org_id, keys in per_org.items():
                    await conn.execute(
                        text("SELECT set_config('apix.org_id', :org, true)"), {"org": str(org_id)}
                    )
                    statement = insert(ApiMinute).values(
                        [
                            {
                                "org_id": org_id,
                                "minute": minute,
                                "api_key_id": key_id,
                                "requests": requests,
                                "errors": errors,
                            }
                            for (key_id, minute), (requests, errors) in keys.items()
                        ]
                    )
                    await conn.execute(
                        statement.on_conflict_do_update(
                            index_elements=["org_id", "minute", "api_key_id"],
                            set_={
                                "requests": ApiMinute.requests + statement.excluded.requests,
                                "errors": ApiMinute.errors + statement.excluded.errors,
                            },
                        )
                    )
        except Exception:
            self._counts.update(counts)  # kept for the next flush
            raise
