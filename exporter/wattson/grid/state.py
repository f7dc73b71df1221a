"""A source's data and counters as plain JSON, so they survive a restart: what to write, and the checks on
what is read back.

The file may be old, cut short, edited by hand or written by another version: every field is checked, and
an entry with anything wrong is skipped with a one-line reason (never an exception, never a partial entry).
Entries are keyed by `source_key`, which changes with the source's config, so a source whose config changed
does not pick up data fetched under the old one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .base import ERROR_REASONS, Interval
from .limits import MAX_GRAMS_PER_KWH

STATE_VERSION = 1
# A week of 5-minute data is ~2,000 intervals; far more is not a cache wattson wrote.
MAX_SAVED_INTERVALS = 20_000
# Times a little ahead of this clock are skew between two runs; more is a broken file or clock.
FUTURE_SLACK_SECONDS = 300.0
_CURRENCY = re.compile(r"^[A-Z]{3}$")


def config_digest(cfg: Any) -> str:
    """A short, stable hash of a source's config: the same keys and values give the same digest in every run.
    Keys left at their default are left out, so a key added with a default in a later version changes
    nothing. No secret is hashed: configs hold only the names of variables and files holding keys."""
    if isinstance(cfg, BaseModel):
        data: Any = cfg.model_dump(mode="json", exclude_defaults=True)
    else:
        data = None if cfg is None else repr(cfg)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_key(signal: str, zone: str, index: int, name: str, digest: str) -> str:
    """The stable key of one source of one chain, e.g. 'carbon/DE/0/electricitymaps/1f2e...'."""
    return f"{signal}/{zone}/{index}/{name}/{digest}"


@dataclass(frozen=True)
class SavedSource:
    """One source as read back, checked: its counters and (if it had data) its cache."""

    up: bool | None
    errors: dict[str, int]
    last_success: float | None
    intervals: tuple[Interval, ...] | None  # None: no cache saved
    currency: str | None
    fetched_at: float | None


def dump_source(up: bool | None, errors: dict[str, int], last_success: float | None,
                intervals: tuple[Interval, ...] | None, currency: str | None,
                fetched_at: float | None) -> dict[str, Any]:
    """One source as JSON-ready data."""
    cache = None
    if intervals is not None:
        cache = {"currency": currency, "fetched_at": fetched_at,
                 "intervals": [[i.start, i.end, i.value, i.estimated, i.forecast, i.origin] for i in intervals]}
    return {"up": up, "errors": dict(sorted(errors.items())), "last_success": last_success, "cache": cache}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what} is not finite")
    return number


def _time(value: Any, what: str, now: float) -> float:
    t = _number(value, what)
    if t < 0 or t > now + FUTURE_SLACK_SECONDS:
        raise ValueError(f"{what} {t:.0f} is in the future or before 1970")
    return t


def _intervals(raw: Any, signal: str, currency: str | None,
               price_limit: Callable[[str | None], float]) -> tuple[Interval, ...]:
    if not isinstance(raw, list):
        raise ValueError("cache.intervals is not a list")
    if len(raw) > MAX_SAVED_INTERVALS:
        raise ValueError(f"cache.intervals has {len(raw)} entries, more than {MAX_SAVED_INTERVALS}")
    if signal == "carbon":
        low, high = 0.0, MAX_GRAMS_PER_KWH
    else:
        limit = price_limit(currency)
        low, high = -limit, limit
    out: dict[float, Interval] = {}
    for n, item in enumerate(raw):
        where = f"cache.intervals[{n}]"
        # The sixth element, the upstream source a hub reported, is absent from files of older versions.
        if not isinstance(item, list) or len(item) not in (5, 6):
            raise ValueError(f"{where} is not [start, end, value, estimated, forecast, origin]")
        start, end, value = (_number(x, f"{where}.{k}") for x, k in zip(item[:3], ("start", "end", "value"),
                                                                           strict=True))
        estimated, forecast = item[3], item[4]
        origin = item[5] if len(item) == 6 else ""
        if not isinstance(estimated, bool) or not isinstance(forecast, bool):
            raise ValueError(f"{where}: estimated and forecast must be true or false")
        if not isinstance(origin, str) or len(origin) > 64:
            raise ValueError(f"{where}: origin must be a short string")
        if end <= start:
            raise ValueError(f"{where} ends before it starts")
        if not low <= value <= high:
            raise ValueError(f"{where}.value {value:g} is outside [{low:g}, {high:g}]")
        if start in out:
            raise ValueError(f"{where} starts at the same time as another interval")
        out[start] = Interval(start, end, value, estimated, forecast, origin)
    if not out:
        raise ValueError("cache.intervals is empty")
    return tuple(out[k] for k in sorted(out))


def parse_source(entry: Any, signal: str, now: float,
                 price_limit: Callable[[str | None], float]) -> SavedSource:
    """A saved entry, checked field by field. Raises ValueError saying what is wrong (one line, no values
    beyond numbers). `price_limit(currency)` is the largest |price| the chain accepts from this source."""
    if not isinstance(entry, dict):
        raise ValueError("not a mapping")
    up = entry.get("up")
    if up is not None and not isinstance(up, bool):
        raise ValueError("up is not true, false or null")
    raw_errors = entry.get("errors", {})
    if not isinstance(raw_errors, dict):
        raise ValueError("errors is not a mapping")
    errors: dict[str, int] = {}
    for reason, count in raw_errors.items():
        if reason not in ERROR_REASONS:
            raise ValueError(f"errors: unknown reason {str(reason)[:40]!r}")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2 ** 53:
            raise ValueError(f"errors.{reason} is not a count")
        errors[reason] = count
    last = entry.get("last_success")
    last_success = None if last is None else _time(last, "last_success", now)
    cache = entry.get("cache")
    if cache is None:
        return SavedSource(up, errors, last_success, None, None, None)
    if not isinstance(cache, dict):
        raise ValueError("cache is not a mapping")
    currency = cache.get("currency")
    if signal == "price":
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise ValueError("cache.currency is not an ISO 4217 code")
    elif currency is not None:
        raise ValueError("cache.currency is set for a carbon source")
    fetched_at = _time(cache.get("fetched_at"), "cache.fetched_at", now)
    intervals = _intervals(cache.get("intervals"), signal, currency, price_limit)
    return SavedSource(up, errors, last_success, intervals, currency, fetched_at)
