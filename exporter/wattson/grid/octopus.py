"""Octopus Energy unit rates (Agile and other public tariffs), in GBP per kWh.

`GET /v1/products/{product}/electricity-tariffs/{tariff}/standard-unit-rates/` needs no key for
public products. Results come newest first and paginated; `next` is an absolute URL, which is
followed only on the configured host (a proxy or test server keeps the path and query, not the
host, so a response can never send us elsewhere). Rates are pence per kWh, exact decimals.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from pydantic import Field, model_validator

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, parse_iso8601, read_secret, require

NAME = "octopus"
CURRENCY = "GBP"
UK_TZ = ZoneInfo("Europe/London")
# Agile rates for the next day appear around 16:00 UK time.
PUBLICATION_LOCAL = time(16, 0)
MAX_ABS_PRICE_PER_KWH = Decimal(100)
_TARIFF = re.compile(r"^E-[12]R-[A-Z0-9-]+-[A-P]$")


class Config(HttpSourceConfigBase, PriceAdjustments):
    type: Literal["octopus"]
    base_url: str = Field(default="https://api.octopus.energy", description="Octopus Energy API root.")
    product_code: str = Field(pattern=r"^[A-Z0-9-]+$", description="Product, e.g. AGILE-24-10-01.")
    tariff_code: str = Field(description="Tariff of that product for one region, e.g. E-1R-AGILE-24-10-01-C.")
    include_vat: bool = Field(default=True, description="Use value_inc_vat (true) or value_exc_vat (false).")
    payment_method: str | None = Field(
        default=None, description="Keep only rates for this payment_method (e.g. DIRECT_DEBIT) and rates "
                                  "without one; unset keeps all.")
    max_pages: int = Field(default=10, ge=1, le=100, description="Most result pages followed per fetch.")
    hours_back: float = Field(default=24.0, ge=1, le=168, description="History requested per fetch.")
    hours_ahead: float = Field(default=48.0, ge=1, le=168, description="Future requested per fetch.")

    @model_validator(mode="after")
    def _check_codes(self) -> Config:
        if not _TARIFF.match(self.tariff_code):
            raise ValueError(f"tariff_code {self.tariff_code!r} is not an electricity tariff code like "
                             "E-1R-AGILE-24-10-01-C")
        if self.product_code not in self.tariff_code:
            raise ValueError(f"tariff_code {self.tariff_code!r} does not belong to product_code "
                             f"{self.product_code!r}")
        return self


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(value: Any, where: str, field_name: str) -> float:
    try:
        return parse_iso8601(value, NAME, field_name)
    except SourceError as exc:
        raise SourceError(exc.reason, f"{NAME}: {where}: field '{field_name}' is not an ISO 8601 time: "
                          f"{str(value)[:40]!r}") from None


def decode_json(body: bytes, where: str) -> Any:
    """JSON with numbers as Decimal, so pence convert to pounds exactly; NaN/Infinity are malformed."""
    def bad_constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")
    try:
        return json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=bad_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError("malformed", f"{where}: response is not valid JSON ({str(exc)[:80]})") from None


class OctopusSource:
    """Half-hourly unit rates of one Octopus tariff."""

    name = NAME
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.cfg = cfg
        self.poll_interval_seconds = cfg.poll_interval_seconds or 1800.0
        # Public products need no key; an account key (basic auth user) unlocks private ones.
        self._key = read_secret(NAME, cfg.api_key_env, cfg.api_key_file, required=False)
        self.client = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds, self.secrets())
        self.path = (f"/v1/products/{cfg.product_code}/electricity-tariffs/{cfg.tariff_code}"
                     "/standard-unit-rates/")
        self.field = "value_inc_vat" if cfg.include_vat else "value_exc_vat"

    def secrets(self) -> tuple[str, ...]:
        return (self._key,) if self._key else ()

    def follow_url(self, next_url: str) -> str:
        """The URL to request for a `next` link: as given on our host, else its path+query on base_url."""
        base = urlsplit(self.client.base_url)
        nxt = urlsplit(next_url)
        if (nxt.scheme, nxt.netloc) == (base.scheme, base.netloc):
            return next_url
        return urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + nxt.path, nxt.query, ""))

    def fetch(self, now: float) -> FetchResult:
        period_from = math.floor(now / 1800) * 1800 - self.cfg.hours_back * 3600
        period_to = math.floor(now / 1800) * 1800 + self.cfg.hours_ahead * 3600
        auth = (self._key, "") if self._key else None
        where = f"{NAME}: GET {self.path}"
        url: str = self.path
        params: dict[str, str] | None = {"period_from": _iso(period_from), "period_to": _iso(period_to)}
        seen: set[str] = set()
        rows: list[Any] = []
        notes: dict[str, str] = {}
        pages = 0
        while True:
            resp = self.client.request("GET", url, params=params, auth=auth)
            body = decode_json(resp.content, where)
            pages += 1
            results = require(body, "results", NAME, f"GET {self.path}")
            if not isinstance(results, list):
                raise SourceError("malformed", f"{where}: field 'results' is not a list")
            rows.extend(results)
            next_url = body.get("next")
            if next_url is None:
                break
            if not isinstance(next_url, str) or not next_url:
                raise SourceError("malformed", f"{where}: field 'next' is not a URL")
            url = self.follow_url(next_url)
            params = None  # the next link carries the query
            if url in seen:
                raise SourceError("malformed", f"{where}: field 'next' links back to a page already read")
            seen.add(url)
            if pages >= self.cfg.max_pages:
                notes["truncated"] = f"stopped after {pages} pages (max_pages)"
                break

        intervals = self.parse(rows, period_to)
        return FetchResult(intervals=intervals, currency=CURRENCY, notes=notes,
                           next_poll_seconds=self.next_poll(now, intervals))

    def parse(self, rows: list[Any], open_end: float) -> tuple[Interval, ...]:
        where = f"GET {self.path}"
        by_start: dict[float, Interval] = {}
        for i, row in enumerate(rows):
            rw = f"{where}: results[{i}]"
            if not isinstance(row, dict):
                raise SourceError("malformed", f"{NAME}: {rw}: expected an object, got {type(row).__name__}")
            method = row.get("payment_method")
            if self.cfg.payment_method and method not in (None, self.cfg.payment_method):
                continue
            value = require(row, self.field, NAME, rw)
            start = _time(require(row, "valid_from", NAME, rw), rw, "valid_from")
            valid_to = require(row, "valid_to", NAME, rw)
            end = open_end if valid_to is None else _time(valid_to, rw, "valid_to")
            if value is None:
                continue  # unknown rate: skipped, never priced as zero
            if not isinstance(value, Decimal) or not value.is_finite():
                raise SourceError("malformed", f"{NAME}: {rw}: field '{self.field}' is not a number")
            if abs(value) / 100 > MAX_ABS_PRICE_PER_KWH:
                raise SourceError("invalid_value", f"{NAME}: {rw}: field '{self.field}' {value} p/kWh is not "
                                  "a plausible price")
            if end <= start:
                if valid_to is None:
                    continue  # open-ended rate starting after the requested window
                raise SourceError("malformed", f"{NAME}: {rw}: valid_to is not after valid_from")
            iv = Interval(start, end, float(value / 100))
            prev = by_start.get(start)
            if prev is not None and prev != iv:
                raise SourceError("malformed", f"{NAME}: {rw}: two rates for {_iso(start)}"
                                  + ("" if self.cfg.payment_method else "; set payment_method"))
            by_start[start] = iv
        intervals = tuple(sorted(by_start.values()))
        for a, b in zip(intervals, intervals[1:], strict=False):
            if b.start < a.end:
                raise SourceError("malformed", f"{NAME}: {where}: rates overlap at {_iso(b.start)}")
        if not intervals:
            raise SourceError("no_data", f"{NAME}: {where}: no rates with field '{self.field}' in the window")
        return intervals

    @staticmethod
    def next_poll(now: float, intervals: tuple[Interval, ...]) -> float | None:
        """Once rates run to the end of tomorrow (UK), nothing new appears before tomorrow's 16:00."""
        local = datetime.fromtimestamp(now, UK_TZ)
        day_after = datetime.combine(local.date() + timedelta(days=2), time(), UK_TZ).timestamp()
        covered = max(iv.end for iv in intervals)
        if covered >= day_after - 3600:  # Agile days end at 23:00 UK time
            nxt = datetime.combine(local.date() + timedelta(days=1), PUBLICATION_LOCAL, UK_TZ).timestamp()
            return max(60.0, nxt - now)
        return None


def build(cfg: Config, zone: str) -> OctopusSource:
    return OctopusSource(cfg, zone)
