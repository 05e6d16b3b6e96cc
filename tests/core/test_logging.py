"""uvicorn's records go through APIX's logging at the level configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from uvicorn.logging import TRACE_LOG_LEVEL

from apix.config import LogSettings
from apix.core.logging import configure_logging


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """What `configure_logging` changes, as it was before the test."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    handlers = logging.getLogger().handlers[:]
    yield
    logging.getLogger().handlers[:] = handlers
    for logger, level in saved:
        logger.setLevel(level)


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_uvicorns_records_follow_the_configured_level(
    level: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LogSettings(level=level, format="json"))  # type: ignore[arg-type]
    uvicorn = logging.getLogger("uvicorn.error")
    # uvicorn formats its per-connection TRACE lines when its logger's own level allows it.
    assert uvicorn.level > TRACE_LOG_LEVEL
    uvicorn.info("an info line")
    uvicorn.warning("a warning line")
    out = capsys.readouterr().out
    assert "a warning line" in out
    assert ("an info line" in out) is (level == "INFO")
