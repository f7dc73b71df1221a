"""ENTSO-E Transparency Platform day-ahead prices (document type A44, "12.1.D Energy Prices").

The platform answers with IEC 62325 XML whose namespace changes between schema versions, so
elements are matched by local name. Gotchas handled here:
- DE-LU publishes two TimeSeries per day (the SDAC auction and the earlier EXAA auction);
  only `classificationSequence_AttributeInstanceComponent.position` 1 is the day-ahead price,
  whatever order the document lists them in.
- curveType A03 omits positions whose price repeats the previous one, up to the period end.
- "No data yet" is an HTTP 200 Acknowledgement_MarketDocument with Reason code 999.
- The security token travels in the query string, so it is never put into messages.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal
from xml.etree.ElementTree import Element, ParseError
from zoneinfo import ZoneInfo

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException
from pydantic import AfterValidator, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator, model_validator

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, read_secret, redact
from .response import ApiModel, asked, fault, parse, plausible_price, show

API_PATH = "/api"
NAME = "entsoe"
# The single day-ahead coupling runs on CET/CEST delivery days for every zone listed here.
MARKET_TZ = ZoneInfo("Europe/Brussels")
# Results are usually published about 12:45 CET; ask again shortly after.
PUBLICATION_LOCAL = time(13, 0)
Resolution = Literal["PT15M", "PT30M", "PT60M", "PT1H"]
RESOLUTIONS_SECONDS: dict[str, int] = {"PT15M": 900, "PT30M": 1800, "PT60M": 3600, "PT1H": 3600}
_EIC = re.compile(r"^[0-9]{2}[A-Z0-9-]{13}[A-Z0-9]$")

# Bidding zones for day-ahead prices. Germany has been priced together with Luxembourg since
# 2018-10-01, so DE and LU both mean the DE-LU zone.
ZONE_EIC: dict[str, str] = {
    "DE-LU": "10Y1001A1001A82H",
    "DE": "10Y1001A1001A82H",
    "LU": "10Y1001A1001A82H",
    "AT": "10YAT-APG------L",
    "BE": "10YBE----------2",
    "CH": "10YCH-SWISSGRIDZ",
    "CZ": "10YCZ-CEPS-----N",
    "DK1": "10YDK-1--------W",
    "DK2": "10YDK-2--------M",
    "ES": "10YES-REE------0",
    "FI": "10YFI-1--------U",
    "FR": "10YFR-RTE------C",
    "IT-NORTH": "10Y1001A1001A73I",
    "NL": "10YNL----------L",
    "NO1": "10YNO-1--------2",
    "PL": "10YPL-AREA-----S",
    "PT": "10YPT-REN------W",
    "SE3": "10Y1001A1001A46L",
    "SE4": "10Y1001A1001A47J",
}


def resolve_zone(zone: str) -> str:
    """An EIC code as given, or the EIC code of a known zone name (DE-LU, de_lu, IT-North, ...)."""
    text = zone.strip()
    if _EIC.match(text):
        return text
    key = text.upper().replace("_", "-")
    if key in ZONE_EIC:
        return ZONE_EIC[key]
    if key.replace("-", "") in ZONE_EIC:  # DK-1, SE-3
        return ZONE_EIC[key.replace("-", "")]
    raise ValueError(f"zone {zone!r} is neither a 16-character EIC code nor one of {', '.join(ZONE_EIC)}")


class Config(HttpSourceConfigBase, PriceAdjustments):
    type: Literal["entsoe"]
    base_url: str = Field(default="https://web-api.tp.entsoe.eu",
                          description="Transparency Platform API root (the request goes to <base_url>/api).")
    api_key_env: str | None = Field(default="ENTSOE_API_KEY",
                                    description="Environment variable holding the security token.")
    zone: str | None = Field(
        default=None, description="Bidding zone as an EIC code (10Y1001A1001A82H) or a known name (DE-LU).")

    @field_validator("zone")
    @classmethod
    def _check_zone(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_zone(v)
        return v


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


# Elements that may repeat; of any other element only the first is read.
REPEATED = frozenset({"TimeSeries", "Period", "Point"})


def _tree(el: Element) -> dict[str, Any]:
    """An element's children by local name (the namespace changes between schema versions): text for a
    leaf, a dict for an element with children, a list for those in REPEATED. Attributes are not read, and
    an empty leaf is left out, so it reads as missing."""
    out: dict[str, Any] = {}
    for child in el:
        name = _local(child.tag)
        if name in REPEATED:
            out.setdefault(name, []).append(_tree(child))
        elif name not in out:
            value = _tree(child) if len(child) else (child.text or "").strip()
            if value != "":
                out[name] = value
    return out


class _Xml(ApiModel):
    """Part of an XML document. Its text is typed by the schema, not by the document (a number arrives
    as text), so values are converted rather than type-checked."""

    model_config = ConfigDict(strict=False)  # merged with ApiModel's: extra fields still ignored


def _utc_time(value: Any) -> float:
    if isinstance(value, str):
        for fmt in ("%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M:%SZ"):
            try:
                return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                continue
    raise fault("malformed", f"is not a UTC time: {show(value)}")


def _same_domain(value: str, info: ValidationInfo) -> str:
    if value != asked(info, "eic"):
        raise fault("wrong_zone", f"is {value}, requested {asked(info, 'eic')}")
    return value


def _iso_4217(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{3}", value):
        raise fault("malformed", f"is not an ISO 4217 code: {show(value)}")
    return value


def _per_mwh(value: str) -> str:
    if value != "MWH":
        raise fault("invalid_value", f"is {show(value)}, expected MWH")
    return value


UtcTime = Annotated[float, PlainValidator(_utc_time)]
Domain = Annotated[str, AfterValidator(_same_domain)]  # an EIC code: the bidding zone asked for


class TimeInterval(_Xml):
    start: UtcTime
    end: UtcTime


class Point(_Xml):
    position: int  # step number within the period, from 1
    amount: Annotated[Decimal, AfterValidator(plausible_price("per MWh", 1000))] = Field(alias="price.amount")


class Period(_Xml):
    """Prices at one resolution over [timeInterval.start, timeInterval.end)."""

    timeInterval: TimeInterval
    resolution: Resolution
    points: list[Point] = Field(default=[], alias="Point")  # none: no prices in this period

    @property
    def steps(self) -> int:
        return int((self.timeInterval.end - self.timeInterval.start) // RESOLUTIONS_SECONDS[self.resolution])

    @model_validator(mode="after")
    def _consistent(self) -> Period:
        start, end, step = self.timeInterval.start, self.timeInterval.end, RESOLUTIONS_SECONDS[self.resolution]
        if end <= start:
            raise fault("malformed", "timeInterval ends at or before its start")
        if (end - start) % step:
            raise fault("malformed", f"timeInterval is not a whole number of {self.resolution} steps")
        seen: set[int] = set()
        for k, point in enumerate(self.points):
            if not 1 <= point.position <= self.steps:
                raise fault("invalid_value", f"Point[{k}]: field 'position' = {point.position} is outside "
                                             f"1..{self.steps}")
            if point.position in seen:
                raise fault("malformed", f"Point[{k}]: position {point.position} repeats")
            seen.add(point.position)
        return self

    def prices(self, curve: str) -> list[tuple[float, float, Decimal]]:
        """(start, end, price per MWh) per listed point. Curve A01 prices one step per point (a missing
        position stays unpriced); A03 holds each price until the next listed position, or the period end."""
        step = RESOLUTIONS_SECONDS[self.resolution]
        ordered = sorted((p.position, p.amount) for p in self.points)
        out = []
        for idx, (position, price) in enumerate(ordered):
            if curve == "A03":
                next_pos = ordered[idx + 1][0] if idx + 1 < len(ordered) else self.steps + 1
            else:
                next_pos = position + 1
            out.append((self.timeInterval.start + (position - 1) * step,
                        self.timeInterval.start + (next_pos - 1) * step, price))
        return out


class TimeSeries(_Xml):
    """One auction's prices for one zone. Its periods are read only if its prices are used (`Period`),
    so another auction's data never fail the fetch."""

    in_domain: Domain = Field(alias="in_Domain.mRID")
    out_domain: Domain | None = Field(default=None, alias="out_Domain.mRID")
    currency: Annotated[str, AfterValidator(_iso_4217)] = Field(alias="currency_Unit.name")
    unit: Annotated[str, AfterValidator(_per_mwh)] = Field(alias="price_Measure_Unit.name")
    # Several auctions for one zone are numbered; number 1 (or none) is the day-ahead (SDAC) price.
    sequence: int | None = Field(default=None, alias="classificationSequence_AttributeInstanceComponent.position")
    curveType: Literal["A01", "A03"] = "A01"
    periods: list[dict[str, Any]] = Field(alias="Period")


class Publication(_Xml):
    type: Literal["A44"] | None = None
    time_series: list[TimeSeries] = Field(default=[], alias="TimeSeries")


class Reason(_Xml):
    code: str = ""
    text: str = ""


class Acknowledgement(_Xml):
    """The answer instead of a Publication when the platform has nothing to publish or refuses."""

    reason: Reason = Field(default_factory=Reason, alias="Reason")


class EntsoeSource:
    """Day-ahead prices for one bidding zone, today and (after publication) tomorrow."""

    name = NAME
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.eic = resolve_zone(cfg.zone or zone)
        self.poll_interval_seconds = cfg.poll_interval_seconds or 3600.0
        self._key_env, self._key_file = cfg.api_key_env, cfg.api_key_file
        try:
            self._token = read_secret(NAME, self._key_env, self._key_file, required=False)
        except SourceError:
            self._token = None  # unreadable key file: reported (as 'auth') by the first fetch
        self.client = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds, self.secrets())

    def secrets(self) -> tuple[str, ...]:
        return (self._token,) if self._token else ()

    def _token_or_raise(self) -> str:
        if not self._token:
            self._token = read_secret(NAME, self._key_env, self._key_file, required=True)
            self.client.secrets = self.secrets()
        assert self._token is not None
        return self._token

    @staticmethod
    def window(now: float) -> tuple[float, float, float]:
        """(start of today, start of tomorrow, end of tomorrow) in the market time zone, as UNIX times."""
        today = datetime.fromtimestamp(now, MARKET_TZ).date()
        starts = [datetime.combine(today + timedelta(days=d), time(), MARKET_TZ).timestamp() for d in range(3)]
        return starts[0], starts[1], starts[2]

    def fetch(self, now: float) -> FetchResult:
        token = self._token_or_raise()
        start, tomorrow, end = self.window(now)
        fmt = "%Y%m%d%H%M"
        params = {
            "documentType": "A44",
            "in_Domain": self.eic,
            "out_Domain": self.eic,
            "periodStart": datetime.fromtimestamp(start, timezone.utc).strftime(fmt),
            "periodEnd": datetime.fromtimestamp(end, timezone.utc).strftime(fmt),
            "securityToken": token,
        }
        resp = self.client.request("GET", API_PATH, params=params)
        intervals, currency = self.parse(resp.content)
        return FetchResult(intervals=intervals, currency=currency,
                           next_poll_seconds=self.next_poll(now, intervals, tomorrow, end))

    @staticmethod
    def next_poll(now: float, intervals: tuple[Interval, ...], tomorrow: float, end: float) -> float | None:
        """Once tomorrow is known nothing changes until the next auction; before 13:00 wait for it."""
        covered_until = max((iv.end for iv in intervals), default=now)
        publication = datetime.combine(datetime.fromtimestamp(now, MARKET_TZ).date(), PUBLICATION_LOCAL,
                                       MARKET_TZ).timestamp()
        if covered_until >= end:
            next_day = datetime.fromtimestamp(tomorrow, MARKET_TZ).date()
            return datetime.combine(next_day, PUBLICATION_LOCAL, MARKET_TZ).timestamp() - now
        if now < publication:
            return publication - now
        return None

    def parse(self, body: bytes) -> tuple[tuple[Interval, ...], str]:
        where = f"{NAME}: GET {API_PATH}"
        try:
            root = DET.fromstring(body)
        except (ParseError, DefusedXmlException, ValueError) as exc:
            raise SourceError("malformed", f"{where}: response is not valid XML ({type(exc).__name__})") from None
        kind = _local(root.tag)
        if kind == "Acknowledgement_MarketDocument":
            raise self._acknowledgement(parse(Acknowledgement, _tree(root), where))
        if kind != "Publication_MarketDocument":
            raise SourceError("malformed", f"{where}: unexpected document {kind!r}")
        doc = parse(Publication, _tree(root), where, {"eic": self.eic})
        if not doc.time_series:
            raise SourceError("no_data", f"{where}: document holds no TimeSeries")
        chosen = [(i, s) for i, s in enumerate(doc.time_series) if s.sequence in (None, 1)]
        if not chosen:
            found = sorted({s.sequence for s in doc.time_series if s.sequence is not None})
            raise SourceError("no_data", f"{where}: no TimeSeries with "
                              f"classificationSequence_AttributeInstanceComponent.position 1 (found {found})")
        currencies = {s.currency for _, s in chosen}
        if len(currencies) != 1:
            raise SourceError("malformed", f"{where}: TimeSeries mix currencies {sorted(currencies)}")
        slots: dict[float, tuple[float, Decimal]] = {}
        for i, series in chosen:
            for j, raw in enumerate(series.periods):
                period = parse(Period, raw, f"{where}: TimeSeries[{i}].Period[{j}]")
                for a, b, value in period.prices(series.curveType):
                    prev = slots.get(a)
                    if prev is not None and prev != (b, value):
                        raise SourceError("malformed", f"{where}: two TimeSeries disagree about the price at "
                                          f"{datetime.fromtimestamp(a, timezone.utc):%Y-%m-%dT%H:%MZ}")
                    slots[a] = (b, value)
        ordered = sorted(slots.items())
        for (_a, (b, _)), (c, _) in zip(ordered, ordered[1:], strict=False):
            if c < b:
                raise SourceError("malformed", f"{where}: TimeSeries periods overlap at "
                                  f"{datetime.fromtimestamp(c, timezone.utc):%Y-%m-%dT%H:%MZ}")
        intervals = tuple(Interval(a, b, float(value / 1000)) for a, (b, value) in ordered)
        if not intervals:
            raise SourceError("no_data", f"{where}: TimeSeries hold no prices")
        return intervals, currencies.pop()

    def _acknowledgement(self, ack: Acknowledgement) -> SourceError:
        where = f"{NAME}: GET {API_PATH}"
        code = ack.reason.code
        # Redact first, then cut: a token straddling the cut must not leave its first characters behind.
        text = " ".join(redact(ack.reason.text, self.secrets()).split())[:200]
        # The platform uses code 999 for every refusal; only "no matching data" means "not published yet".
        if code == "999" and (not text or "no matching data" in text.lower()):
            return SourceError("no_data", f"{where}: acknowledgement {code}: {text or 'no matching data'}")
        return SourceError("http_4xx", f"{where}: acknowledgement {code or '?'}: {text or 'request rejected'}")


def build(cfg: Config, zone: str) -> EntsoeSource:
    return EntsoeSource(cfg, zone)
