"""UK National Grid ESO Carbon Intensity API (Great Britain, no key): half-hourly gCO2/kWh.

National: GET /intensity/{from}/fw24h ->
    {"data": [{"from": "2018-01-20T12:00Z", "to": "...", "intensity": {"forecast": 266, "actual": 263,
               "index": "moderate"}}, ...]}
  `actual` is null for slots not yet measured: then the forecast is used and flagged forecast=True.
Regional (config region_id 1-17): GET /regional/intensity/{from}/fw24h/regionid/{id} ->
    {"data": {"regionid": 3, "dnoregion": "...", "shortname": "...",
              "data": [{"from", "to", "intensity": {"forecast", "index"}, "generationmix": [...]}]}}
  `data` is an OBJECT here (an array in the national answer, and some regional endpoints wrap the
  object in a one-element array; both are accepted). Regional values are forecasts only.

Timestamps use the API's minute format "2018-01-20T12:00Z". GB only: Northern Ireland is not covered.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field

from ..model import SourceConfigBase
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, intensity_value, parse_iso8601, require

NAME = "ukcarbonintensity"
DEFAULT_BASE_URL = "https://api.carbonintensity.org.uk"
SLOT_SECONDS = 1800.0
DEFAULT_POLL_SECONDS = 1800.0  # one poll per half-hour slot
GB_ZONE_LABELS = ("GB", "UK")


class Config(SourceConfigBase):
    type: Literal["ukcarbonintensity"]
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API root; point it at a proxy or test server.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="HTTP timeout per request.")
    region_id: int | None = Field(
        default=None, ge=1, le=17,
        description="Regional forecast for this region id (1-14 DNO regions, 15 England, 16 Scotland, 17 Wales); "
                    "omit for the national (GB) series with measured actuals.")


def api_timestamp(ts: float) -> str:
    """The API's path timestamp format: minutes, UTC, 'Z' suffix."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


class UkCarbonIntensitySource:
    name = NAME
    signal: Signal = "carbon"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.region_id = cfg.region_id
        self.poll_interval_seconds = cfg.poll_interval_seconds or DEFAULT_POLL_SECONDS
        self.http = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds)

    def secrets(self) -> tuple[str, ...]:
        return ()

    def path(self, now: float) -> str:
        # Start one slot before the current one: the slot containing `now` is then always in the
        # answer (whichever way the API rounds `from`), plus one measured slot behind it.
        start = (now // SLOT_SECONDS) * SLOT_SECONDS - SLOT_SECONDS
        if self.region_id is None:
            return f"/intensity/{api_timestamp(start)}/fw24h"
        return f"/regional/intensity/{api_timestamp(start)}/fw24h/regionid/{self.region_id}"

    def _periods(self, body: Any, where: str) -> list[Any]:
        data = require(body, "data", NAME, where)
        if self.region_id is None:
            if not isinstance(data, list):
                raise SourceError("malformed", f"{NAME}: {where}: field 'data' is not an array "
                                               f"(got {type(data).__name__})")
            return data
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
            data = data[0]
        if not isinstance(data, dict):
            raise SourceError("malformed", f"{NAME}: {where}: field 'data' is not a region object "
                                           f"(got {type(data).__name__})")
        regionid = require(data, "regionid", NAME, f"{where}: data")
        if regionid != self.region_id:
            raise SourceError("wrong_zone", f"{NAME}: {where}: field 'data.regionid' is {regionid!r}, "
                                            f"expected {self.region_id}")
        periods = require(data, "data", NAME, f"{where}: data")
        if not isinstance(periods, list):
            raise SourceError("malformed", f"{NAME}: {where}: field 'data.data' is not an array")
        return periods

    def _interval(self, period: Any, where: str) -> Interval | None:
        if not isinstance(period, dict):
            raise SourceError("malformed", f"{NAME}: {where}: expected an object, got {type(period).__name__}")
        start = parse_iso8601(require(period, "from", NAME, where), NAME, f"{where}: from")
        end = parse_iso8601(require(period, "to", NAME, where), NAME, f"{where}: to")
        if end <= start:
            raise SourceError("invalid_value", f"{NAME}: {where}: 'to' is not after 'from'")
        intensity = require(period, "intensity", NAME, where)
        forecast = intensity_value(require(intensity, "forecast", NAME, f"{where}: intensity"), NAME,
                           where, "intensity.forecast")
        actual = None
        if self.region_id is None:  # the regional answer has no 'actual'
            actual = intensity_value(intensity.get("actual"), NAME, where, "intensity.actual")
        if actual is not None:
            return Interval(start, end, actual, estimated=False, forecast=False)
        if forecast is not None:
            return Interval(start, end, forecast, estimated=False, forecast=True)
        return None

    def fetch(self, now: float) -> FetchResult:
        path = self.path(now)
        body = self.http.get_json(path, headers={"Accept": "application/json"})
        where = f"GET {path}"
        if not isinstance(body, dict):
            raise SourceError("malformed", f"{NAME}: {where}: expected a JSON object, got {type(body).__name__}")
        intervals = []
        for i, period in enumerate(self._periods(body, where)):
            interval = self._interval(period, f"{where}: data[{i}]")
            if interval is not None:
                intervals.append(interval)
        if not intervals:
            raise SourceError("no_data", f"{NAME}: {where}: no intensity values in the answer")
        scope = "national" if self.region_id is None else f"region {self.region_id}"
        return FetchResult(intervals=tuple(sorted(intervals)), notes={"scope": scope})


def build(cfg: Config, zone: str) -> UkCarbonIntensitySource:
    """The API covers Great Britain only: refuse other zones at start instead of exporting GB data for them."""
    label = (cfg.zone or zone).strip().upper()
    if label not in GB_ZONE_LABELS and not label.startswith(tuple(f"{z}-" for z in GB_ZONE_LABELS)):
        raise ValueError(f"{NAME}: covers Great Britain only (zone 'GB', 'UK' or 'GB-...'), "
                         f"not zone {cfg.zone or zone!r}")
    return UkCarbonIntensitySource(cfg, zone)
