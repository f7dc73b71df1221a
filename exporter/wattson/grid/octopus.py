"""Octopus Energy unit rates (Agile and other public tariffs), in GBP per kWh.

`GET /v1/products/{product}/electricity-tariffs/{tariff}/standard-unit-rates/` needs no key for
public products. Results come newest first and paginated; `next` is an absolute URL, which is
followed only on the configured host (a proxy or test server keeps the path and query, not the
host, so a response can never send us elsewhere). Rates are pence per kWh, exact decimals.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, read_secret
from .response import ApiModel, IsoTime, fault, parse, plausible_price

NAME = "octopus"
CURRENCY = "GBP"
UK_TZ = ZoneInfo("Europe/London")
# Agile rates for the next day appear around 16:00 UK time.
PUBLICATION_LOCAL = time(16, 0)
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


# A unit rate in pence per kWh, exactly as sent.
Pence = Annotated[Decimal, AfterValidator(plausible_price("p/kWh", 100))]


class Rate(ApiModel):
    """One unit rate, valid over [valid_from, valid_to). `value` is value_inc_vat or value_exc_vat, as
    configured: the two subclasses below."""

    value: Pence | None  # null: rate unknown (skipped, never priced as zero)
    valid_from: IsoTime
    valid_to: IsoTime | None  # null: valid until further notice
    payment_method: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Rate:
        if self.valid_to is not None and self.valid_to <= self.valid_from:
            raise fault("malformed", "valid_to is not after valid_from")
        return self


class RateIncVat(Rate):
    value: Pence | None = Field(alias="value_inc_vat")


class RateExcVat(Rate):
    value: Pence | None = Field(alias="value_exc_vat")


RateT = TypeVar("RateT", bound=Rate)


class Page(ApiModel, Generic[RateT]):
    """One page of unit rates, newest first; `next` is the absolute URL of the next page."""

    results: list[RateT]
    next: Annotated[str, StringConstraints(min_length=1)] | None = None


class OctopusSource:
    """Half-hourly unit rates of one Octopus tariff."""

    name = NAME
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.cfg = cfg
        self.poll_interval_seconds = cfg.poll_interval_seconds or 1800.0
        # Public products need no key; an account key (basic auth user) unlocks private ones.
        self._key_error: SourceError | None = None
        try:
            self._key = read_secret(NAME, cfg.api_key_env, cfg.api_key_file, required=False)
        except SourceError as exc:
            self._key, self._key_error = None, exc  # an unreadable key file: each fetch reports it ('auth')
        self.client = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds, self.secrets())
        self.path = (f"/v1/products/{cfg.product_code}/electricity-tariffs/{cfg.tariff_code}"
                     "/standard-unit-rates/")
        self.field = "value_inc_vat" if cfg.include_vat else "value_exc_vat"
        self.page_model: type[Page[Any]] = Page[RateIncVat] if cfg.include_vat else Page[RateExcVat]

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
        if self._key_error is not None:  # the key file named was unreadable: try again, fail while it is
            self._key = read_secret(NAME, self.cfg.api_key_env, self.cfg.api_key_file, required=False)
            self._key_error = None
            self.client.secrets = self.secrets()
        period_from = math.floor(now / 1800) * 1800 - self.cfg.hours_back * 3600
        period_to = math.floor(now / 1800) * 1800 + self.cfg.hours_ahead * 3600
        auth = (self._key, "") if self._key else None
        where = f"{NAME}: GET {self.path}"
        url: str = self.path
        params: dict[str, str] | None = {"period_from": _iso(period_from), "period_to": _iso(period_to)}
        seen: set[str] = set()
        rates: list[Rate] = []
        notes: dict[str, str] = {}
        pages = 0
        while True:
            body = self.client.get_json(url, params=params, auth=auth)
            pages += 1
            page = parse(self.page_model, body, where if pages == 1 else f"{where} (page {pages})")
            rates.extend(page.results)
            if page.next is None:
                break
            url = self.follow_url(page.next)
            params = None  # the next link carries the query
            if url in seen:
                raise SourceError("malformed", f"{where}: field 'next' links back to a page already read")
            seen.add(url)
            if pages >= self.cfg.max_pages:
                notes["truncated"] = f"stopped after {pages} pages (max_pages)"
                break

        intervals = self.intervals(rates, period_to)
        return FetchResult(intervals=intervals, currency=CURRENCY, notes=notes,
                           next_poll_seconds=self.next_poll(now, intervals))

    def intervals(self, rates: list[Rate], open_end: float) -> tuple[Interval, ...]:
        """The rates that apply (payment method, known value) as intervals in GBP per kWh; a rate without
        valid_to runs to `open_end`, the end of the requested window."""
        where = f"{NAME}: GET {self.path}"
        by_start: dict[float, Interval] = {}
        for rate in rates:
            if self.cfg.payment_method and rate.payment_method not in (None, self.cfg.payment_method):
                continue
            end = open_end if rate.valid_to is None else rate.valid_to
            if rate.value is None or end <= rate.valid_from:
                continue  # unknown rate, or an open-ended one starting after the requested window
            iv = Interval(rate.valid_from, end, float(rate.value / 100))
            prev = by_start.get(iv.start)
            if prev is not None and prev != iv:
                raise SourceError("malformed", f"{where}: two rates for {_iso(iv.start)}"
                                  + ("" if self.cfg.payment_method else "; set payment_method"))
            by_start[iv.start] = iv
        intervals = tuple(sorted(by_start.values()))
        for a, b in zip(intervals, intervals[1:], strict=False):
            if b.start < a.end:
                raise SourceError("malformed", f"{where}: rates overlap at {_iso(b.start)}")
        if not intervals:
            raise SourceError("no_data", f"{where}: no rates with field '{self.field}' in the window")
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
