"""Bundled annual carbon intensity: package data, zone/year resolution, intervals, CSV validation."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import resources

import pytest

from tests.fixture_server import FIXTURES
from wattson.grid import bundled
from wattson.grid.base import Interval
from wattson.grid.registry import CARBON_SOURCES

NOW = datetime(2025, 6, 1, 12, tzinfo=timezone.utc).timestamp()
EU27 = ("AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE").split()
MAJOR = ("GB US CA AU JP IN CN BR NO CH").split()
# The Our World in Data grapher table's 2023 column (whole grams) that the Ember rows were checked against.
OWID_2023 = {"AT": 111, "BE": 138, "BG": 335, "HR": 205, "CY": 534, "CZ": 450, "DK": 152, "EE": 417,
             "FI": 79, "FR": 56, "DE": 381, "GR": 337, "HU": 204, "IE": 291, "BA": 600}


def y(year: int) -> float:
    return datetime(year, 1, 1, tzinfo=timezone.utc).timestamp()


def make(signal_zone: str, **cfg: object) -> bundled.BundledSource:
    return bundled.build(bundled.Config.model_validate({"type": "bundled", **cfg}), signal_zone)


def test_registered() -> None:
    assert CARBON_SOURCES["bundled"] == (bundled.Config, bundled.build)


def test_package_data_coverage() -> None:
    table = bundled.load_table()
    assert len(table) >= 60
    for zone in EU27 + MAJOR + ["EU", "WORLD"]:
        assert zone in table, zone
    assert len(EU27) == 27


def test_package_data_values_sane() -> None:
    for zone, years in bundled.load_table().items():
        for year, row in years.items():
            assert 2021 <= year <= 2024, (zone, year)
            assert 10 <= row.grams_per_kwh <= 1000, (zone, row)
            assert row.retrieved_from in ("ember_yearly_api", "owid_grapher_table"), (zone, row)
            assert row.name


def test_ember_rows_agree_with_owid_table() -> None:
    table = bundled.load_table()
    for zone, owid in OWID_2023.items():
        assert round(table[zone][2023].grams_per_kwh) == owid, zone


def test_source_document_shipped() -> None:
    text = resources.files("wattson.grid").joinpath("data").joinpath("CARBON_INTENSITY_SOURCE.md").read_text()
    for needle in ("Ember", "Our World in Data", "CC BY 4.0", "gCO2e/kWh", "UK", "approximated_by"):
        assert needle in text, needle


def test_default_is_latest_year_and_estimated() -> None:
    src = make("DE")
    assert (src.name, src.signal, src.zone, src.secrets()) == ("bundled", "carbon", "DE", ())
    result = src.fetch(NOW)
    # data year 2023 through the end of the current year (2025)
    assert result.intervals == (Interval(y(2023), y(2026), 380.95, estimated=True, forecast=False),)
    assert result.intervals[0].contains(NOW)
    assert result.notes["data_year"] == "2023" and "approximated_by" not in result.notes
    assert result.currency is None


def test_year_selection() -> None:
    assert make("IN").fetch(NOW).intervals[0].value == 713.0  # 2023 (latest)
    older = make("IN", year=2022).fetch(NOW)
    assert older.intervals[0].value == 705.13
    assert older.intervals[0].start == y(2022) and older.notes["data_year"] == "2022"


def test_year_not_bundled_fails_at_build() -> None:
    with pytest.raises(ValueError, match=r"zone 'DE' in year 2019; available years: 2023"):
        make("DE", year=2019)


def test_interval_rolls_with_now() -> None:
    later = datetime(2031, 3, 1, tzinfo=timezone.utc).timestamp()
    interval = make("FR").fetch(later).intervals[0]
    assert (interval.start, interval.end) == (y(2023), y(2032)) and interval.contains(later)


@pytest.mark.parametrize("label,table_zone,value", [
    ("de", "DE", 380.95), ("UK", "GB", 237.59), ("gb", "GB", 237.59), ("EL", "GR", 336.57),
    ("world", "WORLD", 485.99), ("EU", "EU", 243.83),
])
def test_zone_labels_and_aliases(label: str, table_zone: str, value: float) -> None:
    result = make(label).fetch(NOW)
    assert result.intervals[0].value == value
    assert result.notes["bundled_zone"] == table_zone and "approximated_by" not in result.notes


@pytest.mark.parametrize("label,country", [("US-CAL-CISO", "US"), ("DK-DK1", "DK"), ("SE-SE3", "SE"),
                                           ("UK-scotland", "GB")])
def test_sub_zone_approximated_by_country(label: str, country: str) -> None:
    result = make(label).fetch(NOW)
    assert result.notes["approximated_by"] == country
    assert result.intervals[0].value == max(bundled.load_table()[country].items())[1].grams_per_kwh


def test_config_zone_overrides_signal_zone() -> None:
    src = make("DE", zone="FR")
    assert src.zone == "DE" and src.fetch(NOW).intervals[0].value == 56.04


@pytest.mark.parametrize("label", ["XX", "XX-YY", "", "Germany"])
def test_unknown_zone_fails_at_build(label: str) -> None:
    with pytest.raises(ValueError) as info:
        make(label)
    msg = str(info.value)
    assert msg.startswith(f"bundled: no bundled carbon intensity for zone {label!r}; known zones: ")
    assert "DE" in msg and "UK->GB" in msg and "\n" not in msg


def test_poll_interval() -> None:
    assert make("DE").poll_interval_seconds == 3600
    assert make("DE", poll_interval_seconds=60).poll_interval_seconds == 60


def test_config_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        bundled.Config(type="bundled", year=1800)
    with pytest.raises(ValidationError):
        bundled.Config(type="bundled", grams_per_kwh=1)  # type: ignore[call-arg]


def test_parse_table_fixture() -> None:
    table = bundled.parse_table((FIXTURES / "bundled" / "good.csv").read_text(), "good.csv")
    assert sorted(table) == ["AA", "BB"]
    assert table["AA"][2022].grams_per_kwh == 100.5 and table["BB"][2023].grams_per_kwh == 0.0


@pytest.mark.parametrize("name,words", [
    ("bad_header.csv", "header must contain"),
    ("not_numeric.csv", "line 2: year/grams_per_kwh not numeric"),
    ("negative.csv", "line 2: empty zone or grams_per_kwh outside"),
    ("absurd.csv", "line 2: empty zone or grams_per_kwh outside"),
    ("duplicate.csv", "line 3: duplicate row for zone AA year 2023"),
    ("empty.csv", "holds no rows"),
])
def test_parse_table_rejects_bad_rows(name: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        bundled.parse_table((FIXTURES / "bundled" / name).read_text(), name)
    assert str(info.value).startswith(f"bundled: {name}") and words in str(info.value)
