"""Offline fallback: annual average grid carbon intensity per country, shipped with the package.

The table (`grid/data/carbon_intensity.csv`, Ember / Our World in Data, CC BY 4.0; see
`grid/data/CARBON_INTENSITY_SOURCE.md`) needs no network and no key, so it is the last entry of a
carbon fallback chain. An annual average hides daily and seasonal swings, so every interval it
returns is marked `estimated`.

Zone lookup (case-insensitive): ISO 3166-1 alpha-2 codes plus `EU` and `WORLD`; the aliases in
ZONE_ALIASES (`UK` -> `GB`, `EL` -> `GR`); and a sub-zone `XX-...` that is not in the table falls
back to the national average of `XX` (reported in the fetch notes as `approximated_by`).

An unknown zone or a year the table lacks is a configuration mistake, so `build()` raises
ValueError (the config loader turns it into a config error at start) instead of failing every fetch.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Literal

from pydantic import Field

from ..model import SourceConfigBase
from .base import FetchResult, Interval, Signal
from .limits import MAX_GRAMS_PER_KWH

DATA_PACKAGE = "wattson.grid"
DATA_DIR = "data"
DATA_NAME = "carbon_intensity.csv"

# Documented in CARBON_INTENSITY_SOURCE.md; keep the two in step.
ZONE_ALIASES = {"UK": "GB", "EL": "GR"}

# The data never change while running; an hourly re-fetch only rolls the interval over at New Year.
DEFAULT_POLL_SECONDS = 3600.0


class Config(SourceConfigBase):
    type: Literal["bundled"]
    year: int | None = Field(
        default=None, ge=1990, le=2100,
        description="Data year to use; default: the latest year bundled for the zone.")


@dataclass(frozen=True)
class YearlyIntensity:
    zone: str
    year: int
    grams_per_kwh: float
    name: str
    retrieved_from: str


def parse_table(text: str, source_name: str = f"{DATA_DIR}/{DATA_NAME}") -> dict[str, dict[int, YearlyIntensity]]:
    """CSV text -> zone -> year -> row. Raises ValueError naming the line of any bad row."""
    table: dict[str, dict[int, YearlyIntensity]] = {}
    reader = csv.DictReader(io.StringIO(text))
    required = {"zone", "year", "grams_per_kwh"}
    if not required <= set(reader.fieldnames or ()):
        raise ValueError(f"bundled: {source_name}: header must contain {sorted(required)}")
    for line_no, row in enumerate(reader, start=2):
        where = f"bundled: {source_name} line {line_no}"
        zone = (row["zone"] or "").strip().upper()
        try:
            year = int(row["year"])
            grams = float(row["grams_per_kwh"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: year/grams_per_kwh not numeric") from None
        if not zone or not 0 <= grams <= MAX_GRAMS_PER_KWH:
            raise ValueError(f"{where}: empty zone or grams_per_kwh outside 0..{MAX_GRAMS_PER_KWH:g}")
        if year in table.setdefault(zone, {}):
            raise ValueError(f"{where}: duplicate row for zone {zone} year {year}")
        table[zone][year] = YearlyIntensity(zone, year, grams, (row.get("name") or "").strip(),
                                            (row.get("retrieved_from") or "").strip())
    if not table:
        raise ValueError(f"bundled: {source_name} holds no rows")
    return table


@lru_cache(maxsize=1)
def load_table() -> dict[str, dict[int, YearlyIntensity]]:
    """The package's table, parsed once (importlib.resources: works from wheels and zips too)."""
    text = resources.files(DATA_PACKAGE).joinpath(DATA_DIR).joinpath(DATA_NAME).read_text(encoding="utf-8")
    return parse_table(text)


def known_zones() -> list[str]:
    return sorted(load_table())


def resolve_zone(zone: str) -> tuple[str, bool]:
    """Map a user zone label to a table zone. Returns (table zone, approximated-by-country flag)."""
    table = load_table()
    key = zone.strip().upper()
    key = ZONE_ALIASES.get(key, key)
    if key in table:
        return key, False
    country = key.split("-", 1)[0]
    country = ZONE_ALIASES.get(country, country)
    if "-" in key and country in table:
        return country, True
    raise ValueError(f"bundled: no bundled carbon intensity for zone {zone!r}; "
                     f"known zones: {', '.join(known_zones())} (aliases: "
                     f"{', '.join(f'{a}->{b}' for a, b in sorted(ZONE_ALIASES.items()))}; "
                     f"'XX-...' sub-zones use country XX)")


def _year_start(year: int) -> float:
    return datetime(year, 1, 1, tzinfo=timezone.utc).timestamp()


class BundledSource:
    """Serves one annual average as one interval from the start of its data year to the end of `now`'s year."""

    name = "bundled"
    signal: Signal = "carbon"

    def __init__(self, zone: str, row: YearlyIntensity, approximated: bool,
                 poll_interval_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.zone = zone
        self.row = row
        self.approximated = approximated
        self.poll_interval_seconds = poll_interval_seconds

    def fetch(self, now: float) -> FetchResult:
        now_year = datetime.fromtimestamp(now, tz=timezone.utc).year
        # The figure is the best estimate for its own year and every year since (until the
        # package ships a newer one), so cover the data year through the end of the current year.
        end_year = max(now_year, self.row.year) + 1
        interval = Interval(_year_start(self.row.year), _year_start(end_year), self.row.grams_per_kwh,
                            estimated=True, forecast=False)
        notes = {"data_year": str(self.row.year), "bundled_zone": self.row.zone,
                 "dataset": "Ember / Our World in Data, CC BY 4.0"}
        if self.approximated:
            notes["approximated_by"] = self.row.zone
        return FetchResult(intervals=(interval,), notes=notes)

    def secrets(self) -> tuple[str, ...]:
        return ()


def build(cfg: Config, zone: str) -> BundledSource:
    """Resolve zone and year now, so a typo fails at start rather than at every poll."""
    label = cfg.zone or zone
    table_zone, approximated = resolve_zone(label)
    years = load_table()[table_zone]
    if cfg.year is None:
        row = years[max(years)]
    elif cfg.year in years:
        row = years[cfg.year]
    else:
        raise ValueError(f"bundled: no bundled carbon intensity for zone {table_zone!r} in year {cfg.year}; "
                         f"available years: {', '.join(str(y) for y in sorted(years))}")
    poll = cfg.poll_interval_seconds or DEFAULT_POLL_SECONDS
    return BundledSource(zone, row, approximated, poll)
