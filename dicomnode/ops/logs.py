"""Structured logs: one event per line as `key=value` pairs, UIDs included, never patient
names or IDs (callers pass only UIDs and counts)."""

from __future__ import annotations

import logging
import re
import sys

# Libraries whose messages may quote a dataset's values (pydicom's "Invalid value for VR PN:
# '...'" carries whatever a peer sent, patient names included).
_QUOTING_LOGGERS = ("pydicom", "highdicom", "pynetdicom", "py.warnings")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        base = (f"ts={ts} level={record.levelname.lower()} logger={record.name} "
                f"{record.getMessage()}")
        if record.exc_info:
            base += " exc=" + repr(self.formatException(record.exc_info))
        return base


class RedactQuotedValues(logging.Filter):
    """Replace quoted text in third-party messages (and Python warnings) by '<value>': those
    quote dataset values, and the node's logs never carry patient data."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_QUOTING_LOGGERS):
            record.msg = _QUOTED.sub("'<value>'", record.getMessage())
            record.args = None
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    handler.addFilter(RedactQuotedValues())
    # warnings (pydicom's, for one) go through the handler too, not straight to stderr.
    # Off then on: a second captureWarnings(True) does nothing, even where warnings.showwarning
    # was swapped back since (warnings.catch_warnings does that when it exits).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
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
