"""Structured server logs: one JSON object per line (default) or ``key=value`` text, on stderr.

Call :func:`event` with an event name and fields (``event(log, "stream_end", session=..., outcome=...)``).
What goes in a log line is chosen by the caller; the rule is: session ids, outcomes, counts and
timings yes; prompts, images, tokens and other secrets never.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "streamgen_fields"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                 "logger": record.name, "event": record.getMessage()}
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [stamp, record.levelname.lower(), f"event={record.getMessage()}"]
        for key, value in getattr(record, _FIELDS, {}).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "json", level: str = "info") -> None:
    """Route the root logger to stderr in ``fmt`` ("json" or "text") at ``level``."""
    formatters = {"json": JsonFormatter, "text": KeyValueFormatter}
    if fmt not in formatters:
        raise ValueError(f"unknown log format {fmt!r}; valid: {', '.join(formatters)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatters[fmt]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, name, extra={_FIELDS: fields})
