"""WattTime API v3: 5-minute marginal (co2_moer) or average (co2_aoer) emission rates for one region.

Auth: GET /login with HTTP basic auth (username + password) returns {"token": ...}, a bearer token
valid for 30 minutes. The token is renewed proactively after TOKEN_RENEW_AFTER_SECONDS (measured on
an injectable monotonic clock), and a 401/403 answered to a cached token triggers one re-login and
one retry.

Data: GET /v3/forecast?region=&signal_type= (its first point is the real-time value) and, optionally,
GET /v3/historical?region=&start=&end=&signal_type= for the last hour. Both answer
{"data": [{"point_time", "value"}, ...], "meta": {"region", "signal_type", "units",
"data_point_period_seconds", ...}}. Values in lbs_co2_per_mwh are converted with the exact factor
LBS_PER_MWH_TO_G_PER_KWH. Any other unit (notably the free tier's "percentile" index, 0-100) is not
an emission rate and is refused with 'invalid_value' rather than exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field

from ..model import SourceConfigBase
from .base import LBS_PER_MWH_TO_G_PER_KWH, FetchResult, Interval, Signal, SourceError
from .http import HttpClient, parse_iso8601, read_secret, require

NAME = "watttime"
DEFAULT_BASE_URL = "https://api.watttime.org"
LOGIN_PATH = "/login"
FORECAST_PATH = "/v3/forecast"
HISTORICAL_PATH = "/v3/historical"
# Tokens live 30 min; renew with 5 min to spare so a slow request never carries an expired token.
TOKEN_RENEW_AFTER_SECONDS = 25 * 60.0
DEFAULT_POLL_SECONDS = 300.0  # data points are 5-minute
HISTORICAL_WINDOW_SECONDS = 3600.0
DEFAULT_PERIOD_SECONDS = 300.0
MAX_GRAMS_PER_KWH = 5000.0
# Units WattTime uses for emission rates -> factor to gCO2/kWh. Only units verified in the v3 docs.
UNIT_TO_G_PER_KWH = {"lbs_co2_per_mwh": LBS_PER_MWH_TO_G_PER_KWH}
# Historical data are optional: a plan without them must not lose the forecast's real-time value.
OPTIONAL_FAILURES = ("http_4xx", "auth", "rate_limited", "http_5xx", "timeout", "connection")


class Config(SourceConfigBase):
    type: Literal["watttime"]
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API root; point it at a proxy or test server.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="HTTP timeout per request.")
    username: str = Field(min_length=1, description="WattTime API username.")
    password_env: str | None = Field(default="WATTTIME_PASSWORD",
                                     description="Environment variable holding the WattTime password.")
    password_file: str | None = Field(default=None, description="File holding the WattTime password.")
    signal_type: Literal["co2_moer", "co2_aoer"] = Field(
        default="co2_moer", description="co2_moer: marginal emissions rate; co2_aoer: average emissions rate.")
    use_historical: bool = Field(default=True, description="Also fetch the last hour of historical data.")


class LoginError(SourceError):
    """Logging in failed: never optional, whichever data call needed the token."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class WattTimeSource:
    name = NAME
    signal: Signal = "carbon"

    def __init__(self, cfg: Config, zone: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.zone = zone
        self.region = cfg.zone or zone
        self.cfg = cfg
        self.clock = clock
        self.poll_interval_seconds = cfg.poll_interval_seconds or DEFAULT_POLL_SECONDS
        self._password: str | None = None
        self._token: str | None = None
        self._token_at = 0.0
        self.logins = 0  # how many times we logged in; exposed for tests and debugging
        self.http = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self._password, self._token) if s)

    # --- auth -------------------------------------------------------------------------------
    def _read_password(self) -> str:
        try:
            password = read_secret(NAME, self.cfg.password_env, self.cfg.password_file, required=False)
        except SourceError as exc:
            raise SourceError("auth", str(exc).replace("api key", "password")) from None
        if not password:
            where = " or ".join(x for x in (f"environment variable {self.cfg.password_env}"
                                            if self.cfg.password_env else "",
                                            f"file {self.cfg.password_file}" if self.cfg.password_file else "")
                                if x)
            raise SourceError("auth", f"{NAME}: no password found in {where or 'password_env/password_file'}")
        return password

    def _login(self) -> str:
        try:
            self._password = self._read_password()  # re-read each login: picks up a rotated password
            self.http.secrets = self.secrets()
            resp = self.http.request("GET", LOGIN_PATH, auth=(self.cfg.username, self._password))
            body = self.http.decode_json(resp, LOGIN_PATH)
            token = require(body, "token", NAME, f"GET {LOGIN_PATH}")
            if not isinstance(token, str) or not token:
                raise SourceError("malformed", f"{NAME}: GET {LOGIN_PATH}: field 'token' is not a non-empty string")
        except SourceError as exc:
            raise LoginError(exc.reason, str(exc), retry_after=exc.retry_after) from None
        self._token, self._token_at = token, self.clock()
        self.logins += 1
        self.http.secrets = self.secrets()
        return token

    def _valid_token(self) -> tuple[str, bool]:
        """(token, cached): a cached token younger than the renewal age, else a fresh login."""
        if self._token is not None and self.clock() - self._token_at < TOKEN_RENEW_AFTER_SECONDS:
            return self._token, True
        return self._login(), False

    def _get(self, path: str, params: dict[str, str]) -> Any:
        token, cached = self._valid_token()
        try:
            return self.http.get_json(path, params=params, headers={"Authorization": f"Bearer {token}"})
        except SourceError as exc:
            if exc.reason != "auth" or not cached:
                raise
        # The server rejected a token we still believed valid (revoked, clock skew): log in once more.
        self._token = None
        token = self._login()
        return self.http.get_json(path, params=params, headers={"Authorization": f"Bearer {token}"})

    # --- data -------------------------------------------------------------------------------
    def _parse(self, path: str, body: Any, now: float, forecast_endpoint: bool) -> list[Interval]:
        where = f"GET {path}"
        if not isinstance(body, dict):
            raise SourceError("malformed", f"{NAME}: {where}: expected a JSON object, got {type(body).__name__}")
        meta = require(body, "meta", NAME, where)
        region = require(meta, "region", NAME, f"{where}: meta")
        if not isinstance(region, str) or region.upper() != self.region.upper():
            raise SourceError("wrong_zone", f"{NAME}: {where}: field 'meta.region' is {region!r}, "
                                            f"expected {self.region!r}")
        signal_type = meta.get("signal_type")
        if signal_type is not None and signal_type != self.cfg.signal_type:
            raise SourceError("invalid_value", f"{NAME}: {where}: field 'meta.signal_type' is {signal_type!r}, "
                                               f"expected {self.cfg.signal_type!r}")
        units = require(meta, "units", NAME, f"{where}: meta")
        factor = UNIT_TO_G_PER_KWH.get(units) if isinstance(units, str) else None
        if factor is None:
            raise SourceError("invalid_value", f"{NAME}: {where}: field 'meta.units' is {units!r}, not an emission "
                                               f"rate (expected {', '.join(UNIT_TO_G_PER_KWH)}); not exported")
        period = meta.get("data_point_period_seconds", DEFAULT_PERIOD_SECONDS)
        if isinstance(period, bool) or not isinstance(period, (int, float)) or period <= 0:
            raise SourceError("malformed", f"{NAME}: {where}: field 'meta.data_point_period_seconds' "
                                           f"is not a positive number: {period!r}")
        points = require(body, "data", NAME, where)
        if not isinstance(points, list):
            raise SourceError("malformed", f"{NAME}: {where}: field 'data' is not an array")
        out = []
        for i, point in enumerate(points):
            pwhere = f"{where}: data[{i}]"
            if not isinstance(point, dict):
                raise SourceError("malformed", f"{NAME}: {pwhere}: expected an object, got {type(point).__name__}")
            start = parse_iso8601(require(point, "point_time", NAME, pwhere), NAME, f"{pwhere}: point_time")
            value = require(point, "value", NAME, pwhere)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SourceError("malformed", f"{NAME}: {pwhere}: field 'value' is not a number: {value!r}")
            grams = value * factor
            if not 0 <= grams <= MAX_GRAMS_PER_KWH:
                raise SourceError("invalid_value", f"{NAME}: {pwhere}: field 'value' = {value!r} {units} "
                                                   f"({grams:.1f} gCO2/kWh) is outside 0..{MAX_GRAMS_PER_KWH:g} g/kWh")
            # The forecast's first point is WattTime's real-time value; only later points are forecasts.
            out.append(Interval(start, start + float(period), grams, estimated=False,
                                forecast=forecast_endpoint and start > now))
        return out

    def fetch(self, now: float) -> FetchResult:
        base = {"region": self.region, "signal_type": self.cfg.signal_type}
        by_start: dict[float, Interval] = {}
        notes: dict[str, str] = {"signal_type": self.cfg.signal_type}
        if self.cfg.use_historical:
            params = {**base, "start": _iso(now - HISTORICAL_WINDOW_SECONDS), "end": _iso(now)}
            try:
                body = self._get(HISTORICAL_PATH, params)
            except SourceError as exc:
                if isinstance(exc, LoginError) or exc.reason not in OPTIONAL_FAILURES:
                    raise
                notes["historical"] = f"unavailable ({exc.reason}): {exc}"
            else:
                for interval in self._parse(HISTORICAL_PATH, body, now, forecast_endpoint=False):
                    by_start[interval.start] = interval
        body = self._get(FORECAST_PATH, base)
        for interval in self._parse(FORECAST_PATH, body, now, forecast_endpoint=True):
            by_start.setdefault(interval.start, interval)  # historical (settled) data wins
        if not by_start:
            raise SourceError("no_data", f"{NAME}: region {self.region}: forecast and historical held no values")
        return FetchResult(intervals=tuple(sorted(by_start.values())), notes=notes)


def build(cfg: Config, zone: str, clock: Callable[[], float] = time.monotonic) -> WattTimeSource:
    return WattTimeSource(cfg, zone, clock)
