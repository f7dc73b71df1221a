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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, Strict, ValidationInfo, model_validator

from ..model import SourceConfigBase
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient
from .response import ApiModel, Intensity, IsoTime, asked, fault, parse, show

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


class Forecast(ApiModel):
    """A regional slot's intensity: a forecast only."""

    forecast: Intensity | None  # null: no value for that slot

    def best(self) -> tuple[float, bool] | None:
        """(value, is a forecast), or None when the slot has no value."""
        return None if self.forecast is None else (self.forecast, True)


class Measured(Forecast):
    """A national slot's intensity: the measured value once there is one."""

    actual: Intensity | None = None  # null until the slot has been measured

    def best(self) -> tuple[float, bool] | None:
        return (self.actual, False) if self.actual is not None else super().best()


class Slot(ApiModel):
    """One half-hour [from, to) with its intensity."""

    start: IsoTime = Field(alias="from")
    to: IsoTime
    intensity: Forecast

    @model_validator(mode="after")
    def _ordered(self) -> Slot:
        if self.to <= self.start:
            raise fault("invalid_value", "'to' is not after 'from'")
        return self

    def interval(self) -> Interval | None:
        best = self.intensity.best()
        if best is None:
            return None
        value, forecast = best
        return Interval(self.start, self.to, value, estimated=False, forecast=forecast)


class NationalSlot(Slot):
    intensity: Measured


class National(ApiModel):
    """GET /intensity/{from}/fw24h: Great Britain, measured and forecast."""

    data: list[NationalSlot]


def _same_region(value: int, info: ValidationInfo) -> int:
    if value != asked(info, "region_id"):
        raise fault("wrong_zone", f"is {value}, expected {asked(info, 'region_id')}")
    return value


class Region(ApiModel):
    """One region's forecast."""

    regionid: Annotated[int, Strict(False), AfterValidator(_same_region)]  # JSON numbers arrive as Decimal
    data: list[Slot]  # forecasts only


def _one_region(value: Any) -> Any:
    """The region object; some regional endpoints wrap it in a one-element array."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise fault("malformed", f"is not a region object (got {show(value)})")
    return value


class Regional(ApiModel):
    """GET /regional/intensity/{from}/fw24h/regionid/{id}."""

    data: Annotated[Region, BeforeValidator(_one_region)]


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

    def fetch(self, now: float) -> FetchResult:
        path = self.path(now)
        body = self.http.get_json(path, headers={"Accept": "application/json"})
        where = f"{NAME}: GET {path}"
        if self.region_id is None:
            slots: list[NationalSlot] | list[Slot] = parse(National, body, where).data
        else:
            slots = parse(Regional, body, where, {"region_id": self.region_id}).data.data
        intervals = [iv for slot in slots if (iv := slot.interval()) is not None]
        if not intervals:
            raise SourceError("no_data", f"{where}: no intensity values in the answer")
        scope = "national" if self.region_id is None else f"region {self.region_id}"
        return FetchResult(intervals=tuple(sorted(intervals)), notes={"scope": scope})


def build(cfg: Config, zone: str) -> UkCarbonIntensitySource:
    """The API covers Great Britain only: refuse other zones at start instead of exporting GB data for them."""
    label = (cfg.zone or zone).strip().upper()
    if label not in GB_ZONE_LABELS and not label.startswith(tuple(f"{z}-" for z in GB_ZONE_LABELS)):
        raise ValueError(f"{NAME}: covers Great Britain only (zone 'GB', 'UK' or 'GB-...'), "
                         f"not zone {cfg.zone or zone!r}")
    return UkCarbonIntensitySource(cfg, zone)
