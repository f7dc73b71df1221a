"""logfmt logging to stderr, in the style of Prometheus exporters (ts=... level=... msg=...)."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        parts = [f"ts={ts.replace('+00:00', 'Z')}", f"level={_NAMES.get(record.levelno, 'info')}",
                 f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in (getattr(record, "kv", None) or {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            exc_type, exc, _tb = record.exc_info
            name = exc_type.__name__ if exc_type else "Exception"
            parts.append(f"exc={_quote(f'{name}: {exc}')}")
        return " ".join(parts)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # urllib3 logs full URLs (with query strings that may carry API tokens) at debug level.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
