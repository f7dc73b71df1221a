"""aWATTar market data: EPEX day-ahead prices for Germany and Austria, no key needed.

`GET /v1/marketdata?start=<ms>&end=<ms>` on api.awattar.de or api.awattar.at answers
`{"object": "list", "data": [{"start_timestamp", "end_timestamp", "marketprice", "unit"}],
"url": "/de/v1/marketdata"}` with millisecond UNIX timestamps and prices in Eur/MWh.
The fair-use limit is about 100 requests a day, so polling is hourly.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import Field

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, require
from .octopus import decode_json

NAME = "awattar"
API_PATH = "/v1/marketdata"
CURRENCY = "EUR"
HOSTS = {"DE": "https://api.awattar.de", "AT": "https://api.awattar.at"}
MARKET_TZ = ZoneInfo("Europe/Berlin")  # Berlin and Vienna share CET/CEST
PUBLICATION_LOCAL = time(14, 0)  # aWATTar shows the next day from early afternoon
MAX_ABS_PRICE_PER_KWH = Decimal(100)
UNITS_PER_MWH = {"eur/mwh"}


def country_of(zone: str) -> str:
    """DE, DE-LU, de_lu -> DE; AT -> AT; anything else is a config error."""
    key = zone.strip().upper().replace("_", "-")
    if key in ("DE", "DE-LU"):
        return "DE"
    if key == "AT":
        return "AT"
    raise ValueError(f"aWATTar serves DE (DE-LU) and AT only, not zone {zone!r}; set country")


class Config(HttpSourceConfigBase, PriceAdjustments):
    type: Literal["awattar"]
    country: Literal["DE", "AT"] | None = Field(
        default=None, description="Market: DE (api.awattar.de) or AT (api.awattar.at); default from the zone.")
    base_url: str | None = Field(  # type: ignore[assignment]
        default=None, description="API root override; default is the country's aWATTar host.")


class AwattarSource:
    """Day-ahead prices for DE-LU or AT in EUR/kWh."""

    name = NAME
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.country = cfg.country or country_of(cfg.zone or zone)
        self.poll_interval_seconds = cfg.poll_interval_seconds or 3600.0
        self.client = HttpClient(NAME, cfg.base_url or HOSTS[self.country], cfg.timeout_seconds)

    def secrets(self) -> tuple[str, ...]:
        return ()

    def fetch(self, now: float) -> FetchResult:
        local = datetime.fromtimestamp(now, MARKET_TZ)
        start = datetime.combine(local.date() - timedelta(days=1), time(), MARKET_TZ).timestamp()
        end = datetime.combine(local.date() + timedelta(days=2), time(), MARKET_TZ).timestamp()
        params = {"start": str(int(start * 1000)), "end": str(int(end * 1000))}
        resp = self.client.request("GET", API_PATH, params=params)
        body = decode_json(resp.content, f"{NAME}: GET {API_PATH}")
        intervals = self.parse(body)
        covered = max(iv.end for iv in intervals)
        next_poll = None
        if covered >= end:  # tomorrow is known; the next day appears tomorrow afternoon
            next_day = local.date() + timedelta(days=1)
            next_poll = datetime.combine(next_day, PUBLICATION_LOCAL, MARKET_TZ).timestamp() - now
        return FetchResult(intervals=intervals, currency=CURRENCY, next_poll_seconds=next_poll)

    def parse(self, body: Any) -> tuple[Interval, ...]:
        where = f"GET {API_PATH}"
        data = require(body, "data", NAME, where)
        if not isinstance(data, list):
            raise SourceError("malformed", f"{NAME}: {where}: field 'data' is not a list")
        url = body.get("url")
        if isinstance(url, str):
            segment = url.strip("/").split("/", 1)[0]
            if len(segment) == 2 and segment.isalpha() and segment.upper() != self.country:
                raise SourceError("wrong_zone", f"{NAME}: {where}: field 'url' {url!r} is for "
                                  f"{segment.upper()}, configured {self.country}")
        out: list[Interval] = []
        for i, row in enumerate(data):
            rw = f"{where}: data[{i}]"
            start_ms = self._ms(require(row, "start_timestamp", NAME, rw), rw, "start_timestamp")
            end_ms = self._ms(require(row, "end_timestamp", NAME, rw), rw, "end_timestamp")
            price = require(row, "marketprice", NAME, rw)
            unit = require(row, "unit", NAME, rw)
            if not isinstance(unit, str) or unit.strip().lower() not in UNITS_PER_MWH:
                raise SourceError("invalid_value", f"{NAME}: {rw}: field 'unit' is {unit!r}, expected Eur/MWh")
            if price is None:
                continue  # unknown price: skipped, never priced as zero
            if not isinstance(price, Decimal) or not price.is_finite():
                raise SourceError("malformed", f"{NAME}: {rw}: field 'marketprice' is not a number")
            if abs(price) / 1000 > MAX_ABS_PRICE_PER_KWH:
                raise SourceError("invalid_value", f"{NAME}: {rw}: field 'marketprice' {price} Eur/MWh "
                                  "is not a plausible price")
            if end_ms <= start_ms:
                raise SourceError("malformed", f"{NAME}: {rw}: end_timestamp is not after start_timestamp")
            out.append(Interval(float(start_ms / 1000), float(end_ms / 1000), float(price / 1000)))
        out.sort()
        for a, b in zip(out, out[1:], strict=False):
            if b.start < a.end:
                raise SourceError("malformed", f"{NAME}: {where}: entries overlap at start_timestamp "
                                  f"{int(b.start * 1000)}")
        if not out:
            raise SourceError("no_data", f"{NAME}: {where}: field 'data' holds no prices")
        return tuple(out)

    @staticmethod
    def _ms(value: Any, where: str, field_name: str) -> Decimal:
        if not isinstance(value, Decimal) or not value.is_finite() or value != value.to_integral_value():
            raise SourceError("malformed", f"{NAME}: {where}: field '{field_name}' is not a millisecond "
                              f"timestamp: {str(value)[:40]!r}")
        if not 0 < value < Decimal(10) ** 14:
            raise SourceError("malformed", f"{NAME}: {where}: field '{field_name}' {value} is out of range")
        return value


def build(cfg: Config, zone: str) -> AwattarSource:
    return AwattarSource(cfg, zone)
