"""The logfmt formatter: fixed leading fields, kv() fields, quoting, and exceptions on one line."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from wattson.logfmt import LogfmtFormatter, kv


def record(msg: str, level: int = logging.INFO, exc_info=None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("wattson.test", level, __file__, 1, msg, None, exc_info)
    rec.created = 1_790_000_000.25
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def fmt(msg: str, level: int = logging.INFO, exc_info=None, fields: dict[str, object] | None = None) -> str:
    return LogfmtFormatter().format(record(msg, level, exc_info, **kv(**(fields or {}))))


def test_kv_is_the_extra_argument_the_formatter_reads():
    assert kv(gpu=1, err="x") == {"kv": {"gpu": 1, "err": "x"}}
    assert kv() == {"kv": {}}


def test_leading_fields_then_kv_fields_in_call_order():
    line = fmt("GPU read failed", logging.WARNING, fields={"gpu": 1, "uuid": "GPU-1", "ratio": 0.5})
    assert line == ('ts=2026-09-21T14:13:20.250Z level=warn logger=wattson.test msg="GPU read failed" '
                    "gpu=1 uuid=GPU-1 ratio=0.5")


@pytest.mark.parametrize(("level", "name"), [(logging.DEBUG, "debug"), (logging.INFO, "info"),
                                             (logging.WARNING, "warn"), (logging.ERROR, "error"),
                                             (logging.CRITICAL, "error")])
def test_level_names(level, name):
    assert f" level={name} " in fmt("m", level)


@pytest.mark.parametrize(("value", "written"), [
    ("plain", "plain"),
    ("", '""'),
    ("two words", '"two words"'),
    ("a=b", '"a=b"'),
    ('say "hi"', r'"say \"hi\""'),
    ("C:\\path", r'"C:\\path"'),
    ("line1\nline2", r'"line1\nline2"'),
    ("cr\rtab\t", r'"cr\rtab\t"'),
    ("bell\x07", r'"bell\u0007"'),
    ("grüße", "grüße"),
    (None, "None"),
    (3, "3"),
])
def test_values_are_quoted_and_escaped_only_when_needed(value, written):
    assert fmt("m", fields={"v": value}).endswith(f" v={written}")


def test_log_exception_keeps_exc_and_adds_the_whole_traceback_on_one_line():
    def inner() -> float:
        return 1 / 0

    try:
        inner()
    except ZeroDivisionError:
        line = fmt("unexpected error reading GPU", logging.ERROR, sys.exc_info(), {"gpu": 0})
    assert "\n" not in line and "\r" not in line
    assert ' gpu=0 exc="ZeroDivisionError: division by zero" traceback="Traceback (most recent call last):\\n' in line
    traceback = re.search(r' traceback="((?:[^"\\]|\\.)*)"$', line)
    assert traceback is not None
    text = traceback.group(1).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
    assert "in inner" in text and "return 1 / 0" in text
    assert text.endswith("ZeroDivisionError: division by zero")


def test_through_a_logger_with_exception():
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    log = logging.getLogger("wattson.test.logger")
    lines: list[str] = []
    handler.emit = lambda rec: lines.append(handler.format(rec))  # type: ignore[method-assign]
    log.addHandler(handler)
    try:
        try:
            raise ValueError('bad "value"\nsecond line')
        except ValueError:
            log.exception("failed", extra=kv(step=3))
    finally:
        log.removeHandler(handler)
    (line,) = lines
    assert "\n" not in line
    assert 'msg=failed step=3 exc="ValueError: bad \\"value\\"\\nsecond line" traceback="Traceback' in line
    assert line.endswith('ValueError: bad \\"value\\"\\nsecond line"')


def test_no_traceback_without_an_exception():
    line = fmt("fine")
    assert "exc=" not in line and "traceback=" not in line
