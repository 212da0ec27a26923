"""Log output of the agent: readable lines on a terminal, or one JSON object per line for the journal.

Under systemd (``JOURNAL_STREAM`` set: stderr goes to the journal) each line starts with the kernel-style
``<N>`` priority prefix, which journald strips and stores as the entry's priority, so
``journalctl -u mlecs-agent -p warning`` filters by level while the message stays one JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

# syslog priorities of the logging levels (journald's PRIORITY field).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message (and exc when there is a traceback)."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        if self._journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Sends the agent's logs to stderr in ``log_format``, replacing any earlier configuration."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
