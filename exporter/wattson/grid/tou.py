"""Time-of-use tariff: a weekly schedule of price bands in a named IANA time zone.

Bands are written in local wall-clock time; `fetch` turns them into UTC intervals for
yesterday..day after tomorrow. Daylight-saving changes are handled by cutting time at every
candidate boundary (each band edge in both readings of an ambiguous wall time, plus the
transitions themselves) and pricing each real-time segment by the wall time at its middle:
every real second gets exactly one price, a 00:00-07:00 band on a spring-forward day is 6 h
long, and the repeated autumn hour belongs to whichever band covers its wall time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from ..model import PriceAdjustments, SourceConfigBase, StrictModel
from .base import FetchResult, Interval, Signal

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_GROUPS = {"weekdays": DAY_NAMES[:5], "weekend": DAY_NAMES[5:], "all": DAY_NAMES}
MINUTES_PER_DAY = 24 * 60
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")

DayName = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Band(StrictModel):
    """One price band. A band whose end is not after its start runs past midnight into the next day."""

    days: Literal["weekdays", "weekend", "all"] | list[DayName] = Field(
        description="'weekdays', 'weekend', 'all' or a list of day names (mon..sun) the band starts on.")
    start: str = Field(description="Local start time HH:MM.")
    end: str = Field(description="Local end time HH:MM (24:00 = midnight at the end of the day).")
    price_per_kwh: float = Field(description="Price in currency units per kWh in this band.")

    @field_validator("start", "end")
    @classmethod
    def _check_time(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"time {v!r} must be HH:MM between 00:00 and 24:00")
        return v

    @field_validator("days")
    @classmethod
    def _check_days(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("days must not be empty")
            if len(set(v)) != len(v):
                raise ValueError(f"days lists a day twice: {v}")
        return v

    @model_validator(mode="after")
    def _check_span(self) -> Band:
        if self.start == self.end or (self.start == "24:00"):
            raise ValueError(f"band {self.start}-{self.end} is empty; use 00:00-24:00 for a whole day")
        return self

    def day_indexes(self) -> tuple[int, ...]:
        names = DAY_GROUPS[self.days] if isinstance(self.days, str) else self.days
        return tuple(DAY_NAMES.index(d) for d in names)

    def pieces(self) -> list[tuple[int, int, int, int]]:
        """(weekday, start_minute, end_minute, day_offset) per day the band touches.

        day_offset is 1 for the after-midnight part of a band that started the day before.
        """
        start, end = _minutes(self.start), _minutes(self.end)
        out = []
        for day in self.day_indexes():
            if end > start:
                out.append((day, start, end, 0))
            else:  # wraps past midnight
                out.append((day, start, MINUTES_PER_DAY, 0))
                if end > 0:
                    out.append(((day + 1) % 7, 0, end, 1))
        return out


class Config(SourceConfigBase, PriceAdjustments):
    type: Literal["tou"]
    timezone: str = Field(description="IANA time zone the band times are written in, e.g. Europe/Berlin.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR.")
    bands: list[Band] = Field(min_length=1, description="Price bands; they must not overlap.")
    default_price_per_kwh: float | None = Field(
        default=None, description="Price outside every band; if absent the bands must cover the whole week.")

    @field_validator("timezone")
    @classmethod
    def _check_tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _check_schedule(self) -> Config:
        # Prices are plausible for the currency (bands have no currency of their own, so checked here).
        for i, band in enumerate(self.bands):
            self.check_price(("bands", i, "price_per_kwh"), band.price_per_kwh, self.currency)
        if self.default_price_per_kwh is not None:
            self.check_price(("default_price_per_kwh",), self.default_price_per_kwh, self.currency)
        week = WeekTable.build(self.bands)
        if self.default_price_per_kwh is None:
            gap = week.first_gap()
            if gap is not None:
                day, start, end = gap
                raise ValueError(f"bands do not cover {DAY_NAMES[day]} {_hhmm(start)}-{_hhmm(end)} "
                                 "and no default_price_per_kwh is set")
        return self


@dataclass(frozen=True)
class Slot:
    """What is in force at one wall-clock minute: band index (-1 = default) and its day offset."""

    band: int
    day_offset: int


class WeekTable:
    """Minute-by-minute lookup of the band in force, for each weekday (Monday = 0)."""

    def __init__(self, table: list[list[Slot | None]]) -> None:
        self.table = table

    @classmethod
    def build(cls, bands: list[Band]) -> WeekTable:
        table: list[list[Slot | None]] = [[None] * MINUTES_PER_DAY for _ in range(7)]
        for idx, band in enumerate(bands):
            for day, start, end, offset in band.pieces():
                row = table[day]
                for minute in range(start, end):
                    other = row[minute]
                    if other is not None:
                        raise ValueError(
                            f"bands[{idx}] ({band.start}-{band.end}) overlaps bands[{other.band}] "
                            f"({bands[other.band].start}-{bands[other.band].end}) on {DAY_NAMES[day]} "
                            f"at {_hhmm(minute)}")
                    row[minute] = Slot(idx, offset)
        return cls(table)

    def first_gap(self) -> tuple[int, int, int] | None:
        for day, row in enumerate(self.table):
            minute = 0
            while minute < MINUTES_PER_DAY:
                if row[minute] is None:
                    end = minute
                    while end < MINUTES_PER_DAY and row[end] is None:
                        end += 1
                    return day, minute, end
                minute += 1
        return None

    def at(self, wall: datetime) -> Slot | None:
        return self.table[wall.weekday()][wall.hour * 60 + wall.minute]


def _utc_instants(naive_local: datetime, tz: ZoneInfo) -> set[float]:
    """UNIX times a wall-clock time maps to: two in a repeated hour, the transition instant in a gap."""
    out: set[float] = set()
    for fold in (0, 1):
        aware = naive_local.replace(tzinfo=tz, fold=fold)
        t = aware.timestamp()
        back = datetime.fromtimestamp(t, tz).replace(tzinfo=None)
        if back == naive_local:
            out.add(t)
    if out:
        return out
    # Wall time skipped by a spring-forward change: the edge falls on the change itself, which
    # lies between the fold=1 (post-change offset) and fold=0 (pre-change offset) readings.
    lo = int(naive_local.replace(tzinfo=tz, fold=1).timestamp())
    hi = int(naive_local.replace(tzinfo=tz, fold=0).timestamp())
    after = datetime.fromtimestamp(hi, tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return {float(hi)}


def _transitions(t0: float, t1: float, tz: ZoneInfo) -> set[float]:
    """UTC offset changes in [t0, t1], found by hourly sampling and bisection to the second."""
    out: set[float] = set()
    step = 3600
    t = int(t0)
    prev = datetime.fromtimestamp(t, tz).utcoffset()
    while t < t1:
        nxt = min(t + step, int(math.ceil(t1)))
        off = datetime.fromtimestamp(nxt, tz).utcoffset()
        if off != prev:
            lo, hi = t, nxt
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if datetime.fromtimestamp(mid, tz).utcoffset() == off:
                    hi = mid
                else:
                    lo = mid
            out.add(float(hi))
            prev = off
        t = nxt
    return out


class TouSource:
    """Prices from a weekly local-time schedule; no network, so polling is cheap."""

    name = "tou"
    signal: Signal = "price"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.poll_interval_seconds = cfg.poll_interval_seconds or 3600.0
        self.tz = ZoneInfo(cfg.timezone)
        self.currency = cfg.currency
        self.bands = list(cfg.bands)
        self.default = cfg.default_price_per_kwh
        self.week = WeekTable.build(self.bands)
        self.edges_minutes = sorted({0} | {_minutes(b.start) % MINUTES_PER_DAY for b in self.bands}
                                    | {_minutes(b.end) % MINUTES_PER_DAY for b in self.bands})

    def intervals_for_days(self, first: date, last: date) -> tuple[Interval, ...]:
        """Intervals covering local days first..last inclusive, cut at band edges, in UTC."""
        window_start = min(_utc_instants(datetime.combine(first, time()), self.tz))
        window_end = min(_utc_instants(datetime.combine(last + timedelta(days=1), time()), self.tz))
        cuts: set[float] = {window_start, window_end}
        day = first
        while day <= last:
            midnight = datetime.combine(day, time())
            for minute in self.edges_minutes:
                cuts |= _utc_instants(midnight + timedelta(minutes=minute), self.tz)
            day += timedelta(days=1)
        cuts |= _transitions(window_start, window_end, self.tz)
        points = sorted(t for t in cuts if window_start <= t <= window_end)

        out: list[Interval] = []
        prev_key: tuple[int, date] | None = None
        for a, b in zip(points, points[1:], strict=False):
            wall = datetime.fromtimestamp((a + b) / 2, self.tz).replace(tzinfo=None)
            slot = self.week.at(wall)
            if slot is None:
                if self.default is None:  # the config validator guarantees full coverage
                    raise AssertionError(f"tou: no band covers {wall:%a %H:%M}")
                key, value = (-1, wall.date()), self.default
            else:
                key = (slot.band, wall.date() - timedelta(days=slot.day_offset))
                value = self.bands[slot.band].price_per_kwh
            if key == prev_key and out:
                out[-1] = Interval(out[-1].start, b, value)
            else:
                out.append(Interval(a, b, value))
            prev_key = key
        return tuple(out)

    def fetch(self, now: float) -> FetchResult:
        today = datetime.fromtimestamp(now, self.tz).date()
        intervals = self.intervals_for_days(today - timedelta(days=1), today + timedelta(days=2))
        return FetchResult(intervals=intervals, currency=self.currency,
                           notes={"timezone": str(self.tz.key)})

    def secrets(self) -> tuple[str, ...]:
        return ()


def build(cfg: Config, zone: str) -> TouSource:
    return TouSource(cfg, zone)

