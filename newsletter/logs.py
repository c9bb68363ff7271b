"""Logging for the long-running service: one line per event, plain or JSON, never an address.

What a line carries may come from outside (a relay's reply, a feed's error, an exception's
text): each word holding an "@" is shown as <address>, and control characters (a line break
that would forge a second event, the escapes that drive a terminal) are escaped. A traceback
keeps its lines, each made safe the same way and, in the plain format, indented.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from newsletter.cli import one_line
from newsletter.config import LoggingSettings

ADDRESS = "<address>"
# A run of non-space characters: one match per word, each character read once (linear).
_WORD = re.compile(r"\S+")


def _masked(match: re.Match[str]) -> str:
    return ADDRESS if "@" in match[0] else match[0]


def safe_line(text: str) -> str:
    """One line of log text: words with an "@" masked, every control character escaped."""
    return one_line(_WORD.sub(_masked, text))


def safe_lines(text: str, indent: str = "") -> str:
    """A traceback or stack, line by line as safe_line makes each, each line indented.

    Indented, every line of a traceback in a plain log starts with a space, so a line break
    in an exception's text cannot start a line that reads as an event of its own.
    """
    return "\n".join(indent + safe_line(line) for line in text.splitlines())


class _SafeFormatter(logging.Formatter):
    """A formatter whose message, traceback and stack are made safe (on a copy of the record)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record formatted with its outside text made safe; the record is left as it was."""
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = safe_line(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            safe.exc_text = self.formatException(record.exc_info)
        safe.exc_info = None
        if safe.exc_text:
            safe.exc_text = safe_lines(safe.exc_text, indent="  ")
        if safe.stack_info:
            safe.stack_info = safe_lines(safe.stack_info, indent="  ")
        return super().format(safe)


class PlainFormatter(_SafeFormatter):
    """time level logger: message (then the traceback, if any)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the error, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object, its outside text made safe."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": safe_line(record.getMessage()),
        }
        if record.exc_info:
            entry["error"] = safe_lines(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: LoggingSettings) -> None:
    """Send the service's log lines to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter())
    root = logging.getLogger("newsletter")
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    root.propagate = False
