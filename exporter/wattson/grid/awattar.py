"""aWATTar market data: EPEX day-ahead prices for Germany and Austria, no key needed.

`GET /v1/marketdata?start=<ms>&end=<ms>` on api.awattar.de or api.awattar.at answers
`{"object": "list", "data": [{"start_timestamp", "end_timestamp", "marketprice", "unit"}],
"url": "/de/v1/marketdata"}` with millisecond UNIX timestamps and prices in Eur/MWh.
The fair-use limit is about 100 requests a day, so polling is hourly.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field, PlainValidator, ValidationInfo, model_validator

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient
from .response import ApiModel, asked, fault, parse, plausible_price, show

NAME = "awattar"
API_PATH = "/v1/marketdata"
CURRENCY = "EUR"
HOSTS = {"DE": "https://api.awattar.de", "AT": "https://api.awattar.at"}
MARKET_TZ = ZoneInfo("Europe/Berlin")  # Berlin and Vienna share CET/CEST
PUBLICATION_LOCAL = time(14, 0)  # aWATTar shows the next day from early afternoon


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


def _millis(value: Any) -> int:
    """A UNIX time in whole milliseconds."""
    if not isinstance(value, Decimal) or not value.is_finite() or value != value.to_integral_value():
        raise fault("malformed", f"is not a millisecond timestamp: {show(value)}")
    if not 0 < value < 10 ** 14:
        raise fault("malformed", f"{value} is out of range")
    return int(value)


def _eur_per_mwh(value: str) -> str:
    if value.strip().lower() != "eur/mwh":
        raise fault("invalid_value", f"is {show(value)}, expected Eur/MWh")
    return value


class MarketPrice(ApiModel):
    """One market period [start_timestamp, end_timestamp) and its price in Eur/MWh."""

    start_timestamp: Annotated[int, PlainValidator(_millis)]
    end_timestamp: Annotated[int, PlainValidator(_millis)]
    marketprice: Annotated[Decimal, AfterValidator(plausible_price("Eur/MWh", 1000))] | None  # null: skipped
    unit: Annotated[str, AfterValidator(_eur_per_mwh)]

    @model_validator(mode="after")
    def _ordered(self) -> MarketPrice:
        if self.end_timestamp <= self.start_timestamp:
            raise fault("malformed", "end_timestamp is not after start_timestamp")
        return self


def _same_country(value: str, info: ValidationInfo) -> str:
    """The url names the market it answered for ("/de/v1/marketdata"); other shapes say nothing."""
    segment = value.strip("/").split("/", 1)[0]
    if len(segment) == 2 and segment.isalpha() and segment.upper() != asked(info, "country"):
        raise fault("wrong_zone", f"= {show(value)} is for {segment.upper()}, configured {asked(info, 'country')}")
    return value


class MarketData(ApiModel):
    """GET /v1/marketdata: the market periods asked for; `url` names the market that answered."""

    data: list[MarketPrice]
    url: Annotated[str, AfterValidator(_same_country)] | None = None


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
        body = self.client.get_json(API_PATH, params=params)
        intervals = self.intervals(parse(MarketData, body, f"{NAME}: GET {API_PATH}", {"country": self.country}))
        covered = max(iv.end for iv in intervals)
        next_poll = None
        if covered >= end:  # tomorrow is known; the next day appears tomorrow afternoon
            next_day = local.date() + timedelta(days=1)
            next_poll = datetime.combine(next_day, PUBLICATION_LOCAL, MARKET_TZ).timestamp() - now
        return FetchResult(intervals=intervals, currency=CURRENCY, next_poll_seconds=next_poll)

    @staticmethod
    def intervals(market: MarketData) -> tuple[Interval, ...]:
        """Known prices in EUR/kWh, in time order; periods must not overlap."""
        where = f"{NAME}: GET {API_PATH}"
        out = sorted(Interval(row.start_timestamp / 1000, row.end_timestamp / 1000, float(row.marketprice / 1000))
                     for row in market.data if row.marketprice is not None)
        for a, b in zip(out, out[1:], strict=False):
            if b.start < a.end:
                raise SourceError("malformed", f"{where}: entries overlap at start_timestamp "
                                  f"{int(b.start * 1000)}")
        if not out:
            raise SourceError("no_data", f"{where}: field 'data' holds no prices")
        return tuple(out)


def build(cfg: Config, zone: str) -> AwattarSource:
    return AwattarSource(cfg, zone)
