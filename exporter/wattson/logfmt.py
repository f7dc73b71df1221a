"""logfmt logging to stderr, in the style of Prometheus exporters (ts=... level=... msg=...).

Fields go through `extra=kv(...)`; an exception logged with exc_info adds `exc=` (type and message)
and `traceback=` (the whole formatted traceback, quoted on the one line, since a log line must stay
one line for log shippers).
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import datetime, timezone

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def kv(**fields: object) -> dict[str, dict[str, object]]:
    """The `extra` argument of a logging call that adds logfmt fields: `log.warning("m", extra=kv(gpu=1))`."""
    return {"kv": fields}


def _quote(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with backslash escapes (never a raw newline)."""
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n\r\t') or not text.isprintable():
        text = '"' + "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\u{ord(c):04x}") for c in text) + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        parts = [f"ts={ts.replace('+00:00', 'Z')}", f"level={_NAMES.get(record.levelno, 'info')}",
                 f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in (getattr(record, "kv", None) or {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            exc_type, exc, tb = record.exc_info
            name = exc_type.__name__ if exc_type else "Exception"
            parts.append(f"exc={_quote(f'{name}: {exc}')}")
            if exc_type is not None:
                text = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n")
                parts.append(f"traceback={_quote(text)}")
        return " ".join(parts)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # urllib3 logs full URLs (with query strings that may carry API tokens) at debug level.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
