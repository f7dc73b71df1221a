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
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Literal
from xml.etree.ElementTree import Element, ParseError
from zoneinfo import ZoneInfo

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException
from pydantic import Field, field_validator

from ..model import HttpSourceConfigBase, PriceAdjustments
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, read_secret, redact

API_PATH = "/api"
NAME = "entsoe"
# The single day-ahead coupling runs on CET/CEST delivery days for every zone listed here.
MARKET_TZ = ZoneInfo("Europe/Brussels")
# Results are usually published about 12:45 CET; ask again shortly after.
PUBLICATION_LOCAL = time(13, 0)
MAX_ABS_PRICE_PER_KWH = Decimal(100)
RESOLUTIONS_SECONDS = {"PT15M": 900, "PT30M": 1800, "PT60M": 3600, "PT1H": 3600}
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


def _child(el: Element, name: str) -> Element | None:
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def _children(el: Element, name: str) -> list[Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: Element, name: str, where: str, *, required: bool = True) -> str | None:
    c = _child(el, name)
    value = (c.text or "").strip() if c is not None else ""
    if not value:
        if required:
            raise SourceError("missing_field", f"{NAME}: GET {API_PATH}: {where}: field '{name}' is missing")
        return None
    return value


def _parse_time(value: str, where: str) -> float:
    text = value.strip()
    for fmt in ("%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {where}: not a UTC time: {value!r}")


@dataclass(frozen=True)
class _Series:
    sequence: int | None
    currency: str
    intervals: list[tuple[float, float, Decimal]]


class EntsoeSource:
    """Day-ahead prices for one bidding zone, today and (after publication) tomorrow."""

    name = NAME
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.eic = resolve_zone(cfg.zone or zone)
        self.poll_interval_seconds = cfg.poll_interval_seconds or 3600.0
        self._key_env, self._key_file = cfg.api_key_env, cfg.api_key_file
        self._token = read_secret(NAME, self._key_env, self._key_file, required=False)
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
            raise self._acknowledgement(root)
        if kind != "Publication_MarketDocument":
            raise SourceError("malformed", f"{where}: unexpected document {kind!r}")
        doc_type = _text(root, "type", "Publication_MarketDocument", required=False)
        if doc_type is not None and doc_type != "A44":
            raise SourceError("malformed", f"{where}: field 'type' is {doc_type!r}, expected A44")

        all_series = [self._series(ts, i) for i, ts in enumerate(_children(root, "TimeSeries"))]
        if not all_series:
            raise SourceError("no_data", f"{where}: document holds no TimeSeries")
        # Numbered series are alternative auctions; number 1 is the day-ahead (SDAC) price.
        chosen = [s for s in all_series if s.sequence in (None, 1)]
        if not chosen:
            found = sorted({s.sequence for s in all_series if s.sequence is not None})
            raise SourceError("no_data", f"{where}: no TimeSeries with "
                              f"classificationSequence_AttributeInstanceComponent.position 1 (found {found})")
        currencies = {s.currency for s in chosen}
        if len(currencies) != 1:
            raise SourceError("malformed", f"{where}: TimeSeries mix currencies {sorted(currencies)}")
        slots: dict[float, tuple[float, Decimal]] = {}
        for s in chosen:
            for a, b, value in s.intervals:
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

    def _acknowledgement(self, root: Element) -> SourceError:
        where = f"{NAME}: GET {API_PATH}"
        reason = _child(root, "Reason")
        code = text = ""
        if reason is not None:
            code = (_text(reason, "code", "Reason", required=False) or "")
            text = (_text(reason, "text", "Reason", required=False) or "")
        # Redact first, then cut: a token straddling the cut must not leave its first characters behind.
        text = " ".join(redact(text, self.secrets()).split())[:200]
        # The platform uses code 999 for every refusal; only "no matching data" means "not published yet".
        if code == "999" and (not text or "no matching data" in text.lower()):
            return SourceError("no_data", f"{where}: acknowledgement {code}: {text or 'no matching data'}")
        return SourceError("http_4xx", f"{where}: acknowledgement {code or '?'}: {text or 'request rejected'}")

    def _series(self, ts: Element, index: int) -> _Series:
        where = f"TimeSeries[{index}]"
        for field_name in ("in_Domain.mRID", "out_Domain.mRID"):
            domain = _text(ts, field_name, where, required=field_name == "in_Domain.mRID")
            if domain is not None and domain != self.eic:
                raise SourceError("wrong_zone", f"{NAME}: GET {API_PATH}: {where}: field '{field_name}' is "
                                  f"{domain}, requested {self.eic}")
        currency = _text(ts, "currency_Unit.name", where)
        assert currency is not None
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {where}: field 'currency_Unit.name' is "
                              f"not an ISO 4217 code: {currency!r}")
        unit = _text(ts, "price_Measure_Unit.name", where)
        if unit != "MWH":
            raise SourceError("invalid_value", f"{NAME}: GET {API_PATH}: {where}: field 'price_Measure_Unit.name' "
                              f"is {unit!r}, expected MWH")
        seq_text = _text(ts, "classificationSequence_AttributeInstanceComponent.position", where, required=False)
        sequence = None
        if seq_text is not None:
            if not seq_text.isdigit():
                raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {where}: field "
                                  f"'classificationSequence_AttributeInstanceComponent.position' is {seq_text!r}")
            sequence = int(seq_text)
        curve = _text(ts, "curveType", where, required=False) or "A01"
        if curve not in ("A01", "A03"):
            raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {where}: curveType {curve!r} is not "
                              "supported (A01 or A03)")
        periods = _children(ts, "Period")
        if not periods:
            raise SourceError("missing_field", f"{NAME}: GET {API_PATH}: {where}: field 'Period' is missing")
        intervals: list[tuple[float, float, Decimal]] = []
        if sequence not in (None, 1):
            return _Series(sequence, currency, intervals)  # another auction: checked for zone only
        for j, period in enumerate(periods):
            intervals.extend(self._period(period, f"{where}.Period[{j}]", curve))
        return _Series(sequence, currency, intervals)

    def _period(self, period: Element, where: str, curve: str) -> list[tuple[float, float, Decimal]]:
        api = f"{NAME}: GET {API_PATH}: {where}"
        ti = _child(period, "timeInterval")
        if ti is None:
            raise SourceError("missing_field", f"{api}: field 'timeInterval' is missing")
        start_text = _text(ti, "start", f"{where}.timeInterval")
        end_text = _text(ti, "end", f"{where}.timeInterval")
        assert start_text is not None and end_text is not None
        start = _parse_time(start_text, f"{where}.timeInterval.start")
        end = _parse_time(end_text, f"{where}.timeInterval.end")
        if end <= start:
            raise SourceError("malformed", f"{api}: timeInterval ends at or before its start")
        resolution = _text(period, "resolution", where)
        step = RESOLUTIONS_SECONDS.get(resolution or "")
        if step is None:
            raise SourceError("malformed", f"{api}: field 'resolution' {resolution!r} is not one of "
                              f"{', '.join(RESOLUTIONS_SECONDS)}")
        if (end - start) % step:
            raise SourceError("malformed", f"{api}: timeInterval is not a whole number of {resolution} steps")
        n_slots = int((end - start) // step)

        points: dict[int, Decimal] = {}
        for k, point in enumerate(_children(period, "Point")):
            pw = f"{where}.Point[{k}]"
            pos_text = _text(point, "position", pw)
            assert pos_text is not None
            if not pos_text.isdigit() or not 1 <= int(pos_text) <= n_slots:
                raise SourceError("invalid_value", f"{NAME}: GET {API_PATH}: {pw}: field 'position' "
                                  f"{pos_text!r} is outside 1..{n_slots}")
            position = int(pos_text)
            if position in points:
                raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {pw}: position {position} repeats")
            amount = _text(point, "price.amount", pw)
            assert amount is not None
            try:
                price = Decimal(amount)
            except InvalidOperation:
                raise SourceError("malformed", f"{NAME}: GET {API_PATH}: {pw}: field 'price.amount' is not a "
                                  f"number: {amount[:40]!r}") from None
            if not price.is_finite() or abs(price) / 1000 > MAX_ABS_PRICE_PER_KWH:
                raise SourceError("invalid_value", f"{NAME}: GET {API_PATH}: {pw}: field 'price.amount' "
                                  f"{amount[:40]} per MWh is not a plausible price")
            points[position] = price
        if not points:
            return []

        out: list[tuple[float, float, Decimal]] = []
        ordered = sorted(points.items())
        for idx, (position, price) in enumerate(ordered):
            if curve == "A03":  # holds until the next listed position, or to the end of the period
                next_pos = ordered[idx + 1][0] if idx + 1 < len(ordered) else n_slots + 1
            else:
                next_pos = position + 1
            a = start + (position - 1) * step
            b = start + (next_pos - 1) * step
            out.append((a, b, price))
        return out


def build(cfg: Config, zone: str) -> EntsoeSource:
    return EntsoeSource(cfg, zone)
