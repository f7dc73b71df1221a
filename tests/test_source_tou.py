"""Time-of-use schedules: local band edges to exact UTC intervals, across both DST changes."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from wattson.grid import tou
from wattson.grid.base import Interval
from wattson.grid.registry import PRICE_SOURCES

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def local_midnight(day: date, tz: ZoneInfo = BERLIN) -> float:
    return datetime.combine(day, time(), tz).timestamp()


def config(bands: list[dict[str, Any]], tz: str = "Europe/Berlin", **kw: Any) -> tou.Config:
    return tou.Config.model_validate({"type": "tou", "timezone": tz, "currency": "EUR", "bands": bands, **kw})


NIGHT_DAY = [
    {"days": "all", "start": "00:00", "end": "07:00", "price_per_kwh": 0.20},
    {"days": "weekdays", "start": "07:00", "end": "24:00", "price_per_kwh": 0.35},
    {"days": ["sat", "sun"], "start": "07:00", "end": "24:00", "price_per_kwh": 0.30},
]


def spans(ivs: tuple[Interval, ...]) -> list[tuple[float, float, float]]:
    return [(i.start, i.end, i.value) for i in ivs]


def day_total(ivs: tuple[Interval, ...], day: date, tz: ZoneInfo = BERLIN) -> float:
    """Seconds of the local day covered by the intervals (clipped to the day)."""
    a, b = local_midnight(day, tz), local_midnight(day + timedelta(days=1), tz)
    return sum(max(0.0, min(b, i.end) - max(a, i.start)) for i in ivs)


def assert_contiguous(ivs: tuple[Interval, ...]) -> None:
    for a, b in zip(ivs, ivs[1:], strict=False):
        assert a.end == b.start, (a, b)
        assert a.end > a.start


def test_registered_and_plain_attributes() -> None:
    assert PRICE_SOURCES["tou"] == (tou.Config, tou.build)
    src = tou.build(config(NIGHT_DAY, poll_interval_seconds=600, adder_per_kwh=0.1), "DE")
    assert (src.name, src.signal, src.zone, src.poll_interval_seconds) == ("tou", "price", "DE", 600)
    assert src.secrets() == ()


def test_spring_forward_in_berlin() -> None:
    src = tou.build(config(NIGHT_DAY), "DE")
    result = src.fetch(utc(2026, 3, 29, 12))  # Sunday 2026-03-29, clocks 02:00 -> 03:00
    assert result.currency == "EUR"
    assert spans(result.intervals) == [
        # yesterday, Saturday 28 March (CET, UTC+1)
        (utc(2026, 3, 27, 23), utc(2026, 3, 28, 6), 0.20),
        (utc(2026, 3, 28, 6), utc(2026, 3, 28, 23), 0.30),
        # Sunday: 00:00-07:00 local is 23:00Z-05:00Z, only 6 h long
        (utc(2026, 3, 28, 23), utc(2026, 3, 29, 5), 0.20),
        (utc(2026, 3, 29, 5), utc(2026, 3, 29, 22), 0.30),
        # Monday and Tuesday (CEST, UTC+2)
        (utc(2026, 3, 29, 22), utc(2026, 3, 30, 5), 0.20),
        (utc(2026, 3, 30, 5), utc(2026, 3, 30, 22), 0.35),
        (utc(2026, 3, 30, 22), utc(2026, 3, 31, 5), 0.20),
        (utc(2026, 3, 31, 5), utc(2026, 3, 31, 22), 0.35),
    ]
    assert day_total(result.intervals, date(2026, 3, 29)) == 23 * 3600
    assert day_total(result.intervals, date(2026, 3, 28)) == 24 * 3600


def test_fall_back_in_berlin() -> None:
    result = tou.build(config(NIGHT_DAY), "DE").fetch(utc(2026, 10, 25, 12))  # Sunday, 03:00 -> 02:00
    ivs = result.intervals
    assert (utc(2026, 10, 24, 22), utc(2026, 10, 25, 6), 0.20) in spans(ivs)  # 8 h: the repeated hour counts once more
    assert (utc(2026, 10, 25, 6), utc(2026, 10, 25, 23), 0.30) in spans(ivs)
    assert day_total(ivs, date(2026, 10, 25)) == 25 * 3600
    assert day_total(ivs, date(2026, 10, 26)) == 24 * 3600
    assert ivs[0].start == utc(2026, 10, 23, 22) and ivs[-1].end == utc(2026, 10, 27, 23)
    assert_contiguous(ivs)


EDGE_0230 = [
    {"days": "all", "start": "02:30", "end": "07:00", "price_per_kwh": 0.10},
    {"days": "all", "start": "07:00", "end": "02:30", "price_per_kwh": 0.40},  # runs past midnight
]


def test_edge_inside_the_repeated_hour_prices_each_real_second_once() -> None:
    ivs = tou.build(config(EDGE_0230), "DE").fetch(utc(2026, 10, 25, 12)).intervals
    assert_contiguous(ivs)
    night = [s for s in spans(ivs) if s[1] > utc(2026, 10, 24, 22)]
    assert night[:4] == [
        (utc(2026, 10, 24, 5), utc(2026, 10, 25, 0, 30), 0.40),  # Saturday 07:00 to Sunday 02:30 CEST
        (utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1), 0.10),  # 02:30-03:00 CEST
        (utc(2026, 10, 25, 1), utc(2026, 10, 25, 1, 30), 0.40),  # 02:00-02:30 CET, the second time round
        (utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 6), 0.10),  # 02:30-07:00 CET
    ]
    assert day_total(ivs, date(2026, 10, 25)) == 25 * 3600


def test_edge_inside_the_skipped_hour_falls_on_the_change() -> None:
    ivs = tou.build(config(EDGE_0230), "DE").fetch(utc(2026, 3, 29, 12)).intervals
    assert_contiguous(ivs)
    # 02:30 does not exist on 29 March; the band change happens at the jump, 01:00Z.
    assert (utc(2026, 3, 28, 6), utc(2026, 3, 29, 1), 0.40) in spans(ivs)
    assert (utc(2026, 3, 29, 1), utc(2026, 3, 29, 5), 0.10) in spans(ivs)
    assert day_total(ivs, date(2026, 3, 29)) == 23 * 3600


def test_default_price_fills_gaps_and_bands_can_wrap_midnight() -> None:
    cfg = config([{"days": ["fri"], "start": "22:00", "end": "06:00", "price_per_kwh": 0.05}],
                 default_price_per_kwh=0.25)
    ivs = tou.build(cfg, "DE").fetch(utc(2026, 6, 13, 12)).intervals  # Saturday 13 June 2026 (CEST)
    assert spans(ivs) == [
        (utc(2026, 6, 11, 22), utc(2026, 6, 12, 20), 0.25),  # Friday until 22:00
        (utc(2026, 6, 12, 20), utc(2026, 6, 13, 4), 0.05),  # Fri 22:00 - Sat 06:00, one interval
        (utc(2026, 6, 13, 4), utc(2026, 6, 13, 22), 0.25),  # rest of Saturday
        (utc(2026, 6, 13, 22), utc(2026, 6, 14, 22), 0.25),  # Sunday
        (utc(2026, 6, 14, 22), utc(2026, 6, 15, 22), 0.25),  # Monday
    ]


@pytest.mark.parametrize("tz_name", ["Europe/Berlin", "America/New_York", "Australia/Sydney", "America/Havana",
                                     "Australia/Lord_Howe", "Asia/Kolkata"])
def test_every_local_day_of_a_year_sums_to_its_real_length(tz_name: str) -> None:
    tz = ZoneInfo(tz_name)
    src = tou.build(config(NIGHT_DAY + [], tz=tz_name), "X")
    day = date(2026, 1, 1)
    lengths = set()
    while day.year == 2026:
        ivs = src.intervals_for_days(day, day)
        real = local_midnight(day + timedelta(days=1), tz) - local_midnight(day, tz)
        assert ivs[0].start == local_midnight(day, tz) and ivs[-1].end == local_midnight(day + timedelta(days=1), tz)
        assert sum(i.end - i.start for i in ivs) == real, day
        assert_contiguous(ivs)
        lengths.add(real)
        day += timedelta(days=1)
    assert 86400 in lengths


def test_overlapping_bands_are_a_config_error_naming_both() -> None:
    with pytest.raises(ValidationError) as info:
        config([{"days": "all", "start": "00:00", "end": "24:00", "price_per_kwh": 0.2},
                {"days": ["wed"], "start": "12:00", "end": "13:00", "price_per_kwh": 0.5}])
    msg = str(info.value)
    assert "bands[1] (12:00-13:00) overlaps bands[0] (00:00-24:00) on wed at 12:00" in msg


def test_uncovered_time_without_default_names_day_and_time() -> None:
    with pytest.raises(ValidationError, match=r"bands do not cover sat 07:00-24:00"):
        config(NIGHT_DAY[:2])
    with pytest.raises(ValidationError, match=r"bands do not cover mon 00:00-06:00"):
        config([{"days": "all", "start": "06:00", "end": "24:00", "price_per_kwh": 0.2}])
    # The same schedule is fine once a default price exists.
    config(NIGHT_DAY[:2], default_price_per_kwh=0.3)


@pytest.mark.parametrize(("band", "needle"), [
    ({"start": "7:00"}, "HH:MM"),
    ({"start": "25:00"}, "HH:MM"),
    ({"end": "24:30"}, "HH:MM"),
    ({"start": "24:00"}, "empty"),
    ({"start": "08:00", "end": "08:00"}, "empty"),
    ({"days": []}, "must not be empty"),
    ({"days": ["mon", "mon"]}, "twice"),
    ({"days": ["monday"]}, "days"),
    ({"days": "workdays"}, "days"),
    ({"price_per_kwh": 150.0}, "plausible"),
])
def test_invalid_band(band: dict[str, Any], needle: str) -> None:
    base = {"days": "all", "start": "00:00", "end": "24:00", "price_per_kwh": 0.2}
    with pytest.raises(ValidationError, match=needle):
        config([{**base, **band}])


def test_invalid_zone_and_currency() -> None:
    full = [{"days": "all", "start": "00:00", "end": "24:00", "price_per_kwh": 0.2}]
    with pytest.raises(ValidationError, match="unknown IANA time zone"):
        config(full, tz="Europe/Atlantis")
    with pytest.raises(ValidationError, match="currency"):
        config(full, currency="euro")
    with pytest.raises(ValidationError, match="extra"):
        config(full, price=1)
