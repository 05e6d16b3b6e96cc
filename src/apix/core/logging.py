"""Structured logs: JSON lines when stdout is not a terminal, readable lines on one.

Every line logged while a request is handled carries its ``request_id`` (bound in
`apix.app`'s middleware through structlog's context variables); uvicorn's and the standard
library's loggers go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from apix.config import LogSettings

get_logger = structlog.stdlib.get_logger


def configure_logging(settings: LogSettings) -> None:
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # uvicorn installs its own handlers; route its records through ours instead.
    # Their level is set, not inherited: uvicorn reads a logger's own level to decide
    # whether to format TRACE lines, and at NOTSET it formatted two for every connection.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(settings.level)
    # One access line per request is written by our middleware, with the request id.
    logging.getLogger("uvicorn.access").disabled = True
    # pgserver narrates every step at INFO; keep its warnings only.
    for name in ("pgserver",):
        logging.getLogger(name).setLevel(logging.WARNING)


def _identity(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict
