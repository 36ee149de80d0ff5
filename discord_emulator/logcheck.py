"""Failing a test when discord.py (or asyncio) logged an error, e.g. an exception in a handler."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class ErrorRecords(logging.Handler):
    """Collects ERROR (and worse) records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self) -> str:
        formatter = logging.Formatter("%(name)s: %(message)s")
        return "\n".join(formatter.format(r) for r in self.records)


@contextlib.contextmanager
def fail_on_logged_errors(*logger_names: str) -> Iterator[ErrorRecords]:
    """Raises AssertionError at exit if any of the loggers (default: discord, asyncio) logged an error."""
    names = logger_names or ("discord", "asyncio")
    handler = ErrorRecords()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    if handler.records:
        raise AssertionError("errors were logged during the test:\n" + handler.report())
