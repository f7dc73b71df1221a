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

from typing import Any, Literal

from pydantic import Field

from ..model import HttpSourceConfigBase
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, intensity_value, parse_iso8601, read_secret, require

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

    def _get(self, kind: str) -> tuple[str, Any]:
        path = f"/v3/carbon-intensity/{kind}"
        params = {"zone": self.api_zone, "emissionFactorType": self.cfg.emission_factor_type}
        body = self.http.get_json(path, params=params, headers={"auth-token": self._api_key()})
        if not isinstance(body, dict):
            raise SourceError("malformed", f"{NAME}: GET {path}: expected a JSON object, got {type(body).__name__}")
        self._check_zone(body, f"GET {path}")
        return path, body

    def _check_zone(self, obj: dict[str, Any], where: str) -> None:
        got = require(obj, "zone", NAME, where)
        if not isinstance(got, str) or got.upper() != self.api_zone.upper():
            raise SourceError("wrong_zone", f"{NAME}: {where}: field 'zone' is {got!r}, expected {self.api_zone!r}")

    def _entry(self, entry: Any, where: str, forecast: bool) -> Interval | None:
        if not isinstance(entry, dict):
            raise SourceError("malformed", f"{NAME}: {where}: expected an object, got {type(entry).__name__}")
        if "zone" in entry:
            self._check_zone(entry, where)
        value = intensity_value(require(entry, "carbonIntensity", NAME, where), NAME, where, "carbonIntensity")
        start = parse_iso8601(require(entry, "datetime", NAME, where), NAME, f"{where}: datetime")
        if value is None:
            return None
        estimated = entry.get("isEstimated")
        if estimated is not None and not isinstance(estimated, bool):
            raise SourceError("malformed", f"{NAME}: {where}: field 'isEstimated' is not a boolean: {estimated!r}")
        return Interval(start, start + HOUR_SECONDS, value, estimated=bool(estimated), forecast=forecast)

    def _series(self, path: str, body: dict[str, Any], key: str, forecast: bool) -> list[Interval]:
        entries = require(body, key, NAME, f"GET {path}")
        if not isinstance(entries, list):
            raise SourceError("malformed", f"{NAME}: GET {path}: field '{key}' is not an array")
        out = []
        for i, entry in enumerate(entries):
            interval = self._entry(entry, f"GET {path}: {key}[{i}]", forecast)
            if interval is not None:
                out.append(interval)
        return out

    def _optional_series(self, kind: str, forecast: bool, notes: dict[str, str]) -> list[Interval]:
        """History and forecast only add hours around `latest`: a plan, mirror or outage without them
        costs those hours (noted), not the signal. Bad content still fails the fetch."""
        try:
            path, body = self._get(kind)
        except SourceError as exc:
            if exc.reason not in OPTIONAL_FAILURES:
                raise
            notes[kind] = f"unavailable ({exc.reason}): {exc}"
            return []
        return self._series(path, body, kind, forecast=forecast)

    def fetch(self, now: float) -> FetchResult:
        notes: dict[str, str] = {"emission_factor_type": self.cfg.emission_factor_type}
        path, body = self._get("latest")  # the one endpoint every plan has
        latest = self._entry(body, f"GET {path}", forecast=False)
        by_start = {iv.start: iv for iv in self._optional_series("history", False, notes)}
        if latest is not None:
            by_start[latest.start] = latest  # fresher than the same hour in history
        if self.cfg.use_forecast:
            for interval in self._optional_series("forecast", True, notes):
                by_start.setdefault(interval.start, interval)  # never replace measured data
        if not by_start:
            raise SourceError("no_data", f"{NAME}: zone {self.api_zone}: history, latest and forecast "
                                         "held no carbonIntensity values")
        return FetchResult(intervals=tuple(sorted(by_start.values())), notes=notes)


def build(cfg: Config, zone: str) -> ElectricityMapsSource:
    return ElectricityMapsSource(cfg, zone)
