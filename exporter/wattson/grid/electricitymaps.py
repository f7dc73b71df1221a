"""Electricity Maps API v3: hourly grid carbon intensity (history, latest, forecast) for one zone.

Calls, each with the `auth-token` header and `zone` + `emissionFactorType` query parameters:
- GET /v3/carbon-intensity/history   -> {"zone": .., "history": [entry, ...]}  (past 24 h, hourly)
- GET /v3/carbon-intensity/latest    -> entry                                   (current hour)
- GET /v3/carbon-intensity/forecast  -> {"zone": .., "forecast": [{"carbonIntensity", "datetime"}, ...]}
where entry = {"zone", "carbonIntensity", "datetime" (start of the hour), "updatedAt",
"isEstimated", "estimationMethod", ...}. A null carbonIntensity (no data for that hour) is skipped.

The forecast is optional (not on every plan): when history and latest worked, an HTTP-level failure
of the forecast call (4xx, auth, 429, 5xx, timeout) only adds a note. A forecast whose content is
wrong (bad JSON, wrong zone, impossible values) still fails the fetch: it means the API answered
with something we must not trust.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import Field

from ..model import HttpSourceConfigBase
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, read_secret
from .response import ApiModel, Intensity, IsoTime, SameZone, parse

NAME = "electricitymaps"
DEFAULT_BASE_URL = "https://api.electricitymap.org"
DEFAULT_KEY_ENV = "ELECTRICITYMAPS_API_KEY"
HOUR_SECONDS = 3600.0
# Data are hourly; 10 min catches a new hour soon enough and stays well inside free-tier quotas.
DEFAULT_POLL_SECONDS = 600.0
# Forecast failures that say "not available to you / right now", not "the data are wrong".
OPTIONAL_FAILURES = ("http_4xx", "auth", "rate_limited", "http_5xx", "timeout", "connection")


class Config(HttpSourceConfigBase):
    type: Literal["electricitymaps"]
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API root; point it at a proxy or test server.")
    api_key_env: str | None = Field(default=DEFAULT_KEY_ENV,
                                    description="Environment variable holding the Electricity Maps API key.")
    emission_factor_type: Literal["lifecycle", "direct"] = Field(
        default="lifecycle", description="lifecycle (incl. upstream emissions) or direct (combustion only).")
    use_forecast: bool = Field(default=True, description="Also fetch the forecast (not available on all plans).")


class Hour(ApiModel):
    """One hour of carbon intensity, as history, latest and forecast all list it."""

    zone: SameZone | None = None  # history entries repeat the zone; forecast entries leave it out
    carbonIntensity: Intensity | None  # null: no value for that hour (skipped, never 0)
    datetime: IsoTime  # start of the hour
    isEstimated: bool | None = None

    def interval(self, forecast: bool) -> Interval | None:
        if self.carbonIntensity is None:
            return None
        return Interval(self.datetime, self.datetime + HOUR_SECONDS, self.carbonIntensity,
                        estimated=bool(self.isEstimated), forecast=forecast)


class Latest(Hour):
    """The current hour: one entry, which always names its zone."""

    zone: SameZone


class History(ApiModel):
    """The past 24 hours."""

    zone: SameZone
    history: list[Hour]


class Forecast(ApiModel):
    """The hours ahead (not on every plan)."""

    zone: SameZone
    forecast: list[Hour]


Answer = TypeVar("Answer", Latest, History, Forecast)


def _intervals(hours: list[Hour], forecast: bool) -> list[Interval]:
    return [iv for hour in hours if (iv := hour.interval(forecast)) is not None]


class ElectricityMapsSource:
    name = NAME
    signal: Signal = "carbon"

    def __init__(self, cfg: Config, zone: str) -> None:
        self.zone = zone
        self.api_zone = cfg.zone or zone
        self.cfg = cfg
        self.poll_interval_seconds = cfg.poll_interval_seconds or DEFAULT_POLL_SECONDS
        try:
            self._key = read_secret(NAME, cfg.api_key_env, cfg.api_key_file, required=False)
        except SourceError:
            self._key = None  # unreadable key file: reported (as 'auth') by the first fetch
        self.http = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds, secrets=self.secrets())

    def secrets(self) -> tuple[str, ...]:
        return (self._key,) if self._key else ()

    def _api_key(self) -> str:
        if not self._key:
            self._key = read_secret(NAME, self.cfg.api_key_env, self.cfg.api_key_file, required=True)
            self.http.secrets = self.secrets()
        assert self._key is not None
        return self._key

    def _get(self, kind: str, model: type[Answer]) -> Answer:
        path = f"/v3/carbon-intensity/{kind}"
        params = {"zone": self.api_zone, "emissionFactorType": self.cfg.emission_factor_type}
        body = self.http.get_json(path, params=params, headers={"auth-token": self._api_key()})
        return parse(model, body, f"{NAME}: GET {path}", {"zone": self.api_zone})

    def _optional(self, kind: str, model: type[Answer], notes: dict[str, str]) -> Answer | None:
        """History and forecast only add hours around `latest`: a plan, mirror or outage without them
        costs those hours (noted), not the signal. Bad content still fails the fetch."""
        try:
            return self._get(kind, model)
        except SourceError as exc:
            if exc.reason not in OPTIONAL_FAILURES:
                raise
            notes[kind] = f"unavailable ({exc.reason}): {exc}"
            return None

    def fetch(self, now: float) -> FetchResult:
        notes: dict[str, str] = {"emission_factor_type": self.cfg.emission_factor_type}
        latest = self._get("latest", Latest)  # the one endpoint every plan has
        history = self._optional("history", History, notes)
        forecast = self._optional("forecast", Forecast, notes) if self.cfg.use_forecast else None
        by_start = {iv.start: iv for iv in _intervals(history.history if history else [], forecast=False)}
        for iv in _intervals([latest], forecast=False):
            by_start[iv.start] = iv  # fresher than the same hour in history
        for iv in _intervals(forecast.forecast if forecast else [], forecast=True):
            by_start.setdefault(iv.start, iv)  # never replace measured data
        if not by_start:
            raise SourceError("no_data", f"{NAME}: zone {self.api_zone}: history, latest and forecast "
                                         "held no carbonIntensity values")
        return FetchResult(intervals=tuple(sorted(by_start.values())), notes=notes)


def build(cfg: Config, zone: str) -> ElectricityMapsSource:
    return ElectricityMapsSource(cfg, zone)
