"""Logging. Every module logs structured events (structlog's API: an event name and
fields) through the standard logging module, under the logger ``charging``. A library
prints nothing unless the application configures logging: the ``charging`` logger has a
NullHandler, so not even warnings reach Python's last-resort output. An application sees
the events in its own logging set-up (the event name is the message, the fields are the
record's attributes). The CLI, the worker and the tools call configure(): one JSON object
per line on stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

ROOT = "charging"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


class _Logger(structlog.stdlib.BoundLogger):
    """Returns at once for a level nobody listens to, before building the event: the worker
    logs every settled entry at debug, so that check is on its hot path."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.DEBUG):
            return self._proxy_to_logger("debug", event, *args, **kw)
        return None

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.INFO):
            return self._proxy_to_logger("info", event, *args, **kw)
        return None


def logger(name: str) -> Any:
    """The structlog logger of a module; name is under ``charging``."""
    return structlog.wrap_logger(
        logging.getLogger(name), wrapper_class=_Logger, cache_logger_on_first_use=True,
        processors=[structlog.contextvars.merge_contextvars, structlog.stdlib.render_to_log_kwargs])


class _JsonLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure() installs, so a second call replaces it instead of adding one."""


def configure(level: str = "info") -> None:
    """For the processes this package owns (CLI, worker, tools): every record, the
    library's and other libraries' warnings alike, as one JSON object per line on stderr.
    The handler writes a line with one write() call, so consumers of --processes N sharing
    stderr never interleave inside a line."""
    handler = _JsonLines(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonLines)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(level.upper())
