"""Structured logs: one event per line as `key=value` pairs, UIDs included, never patient
names or IDs (callers pass only UIDs and counts)."""

from __future__ import annotations

import logging
import sys


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        base = (f"ts={ts} level={record.levelname.lower()} logger={record.name} "
                f"{record.getMessage()}")
        if record.exc_info:
            base += " exc=" + repr(self.formatException(record.exc_info))
        return base


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO (one line per PDU); keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def kv(**fields: object) -> str:
    """Render fields as `k=v` pairs, quoting values that contain spaces."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
