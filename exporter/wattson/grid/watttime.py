"""WattTime API v3: 5-minute marginal (co2_moer) or average (co2_aoer) emission rates for one region.

Auth: GET /login with HTTP basic auth (username + password) returns {"token": ...}, a bearer token
valid for 30 minutes. The token is renewed proactively after TOKEN_RENEW_AFTER_SECONDS (measured on
an injectable monotonic clock), and a 401/403 answered to a cached token triggers one re-login and
one retry.

Data: GET /v3/forecast?region=&signal_type= (its first point is the real-time value) and, optionally,
GET /v3/historical?region=&start=&end=&signal_type= for the last hour. Both answer `Answer` below.
Values in lbs_co2_per_mwh are converted with the exact factor LBS_PER_MWH_TO_G_PER_KWH. Any other
unit (notably the free tier's "percentile" index, 0-100) is not an emission rate and is refused with
'invalid_value' rather than exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, ValidationInfo

from ..model import SourceConfigBase
from .base import LBS_PER_MWH_TO_G_PER_KWH, FetchResult, Interval, MissingSecret, Signal, SourceError
from .http import HttpClient, read_secret
from .limits import MAX_GRAMS_PER_KWH
from .response import ApiModel, IsoTime, SameZone, asked, fault, parse, show

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
# The one unit of emission rates verified in the v3 docs; its conversion to g/kWh is exact.
UNITS = "lbs_co2_per_mwh"
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


def _signal_type(value: str, info: ValidationInfo) -> str:
    want = asked(info, "signal_type")
    if value != want:
        raise fault("invalid_value", f"is {show(value)}, expected {show(want)}")
    return value


def _units(value: str) -> str:
    if value != UNITS:
        raise fault("invalid_value", f"is {show(value)}, not an emission rate (expected {UNITS}); not exported")
    return value


def _lbs_per_mwh(value: float) -> float:
    grams = value * LBS_PER_MWH_TO_G_PER_KWH
    if not 0 <= grams <= MAX_GRAMS_PER_KWH:
        raise fault("invalid_value", f"= {show(value)} {UNITS} ({grams:.1f} gCO2/kWh) "
                                     f"is outside 0..{MAX_GRAMS_PER_KWH:g} g/kWh")
    return value


class Login(ApiModel):
    """GET /login: a bearer token valid for 30 minutes."""

    token: Annotated[str, StringConstraints(min_length=1)]


class Meta(ApiModel):
    """What the data are: for which region, which signal, in which unit, at what spacing."""

    region: SameZone
    signal_type: Annotated[str, AfterValidator(_signal_type)] | None = None
    units: Annotated[str, AfterValidator(_units)]
    data_point_period_seconds: float = Field(default=DEFAULT_PERIOD_SECONDS, gt=0)


class Point(ApiModel):
    point_time: IsoTime  # start of the period
    # In UNITS (Meta refuses any other unit); null: no value (skipped, never 0).
    value: Annotated[float, AfterValidator(_lbs_per_mwh)] | None


class Answer(ApiModel):
    """What /v3/forecast and /v3/historical answer. `meta` comes first: a wrong region or unit says more
    than any value measured in it."""

    meta: Meta
    data: list[Point]


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
        """The password, re-read at each login (picks up a rotated one); MissingSecret when there is none."""
        password = read_secret(NAME, self.cfg.password_env, self.cfg.password_file, required=True,
                               what="password")
        assert password is not None
        return password

    def _login(self) -> str:
        self._password = self._read_password()  # MissingSecret as is: the chain reports it once
        self.http.secrets = self.secrets()
        try:
            body = self.http.get_json(LOGIN_PATH, auth=(self.cfg.username, self._password))
            token = parse(Login, body, f"{NAME}: GET {LOGIN_PATH}").token
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
        answer = parse(Answer, body, f"{NAME}: GET {path}",
                       {"zone": self.region, "signal_type": self.cfg.signal_type})
        period = answer.meta.data_point_period_seconds
        # The forecast's first point is WattTime's real-time value; only later points are forecasts.
        return [Interval(p.point_time, p.point_time + period, p.value * LBS_PER_MWH_TO_G_PER_KWH, estimated=False,
                         forecast=forecast_endpoint and p.point_time > now)
                for p in answer.data if p.value is not None]

    def fetch(self, now: float) -> FetchResult:
        base = {"region": self.region, "signal_type": self.cfg.signal_type}
        by_start: dict[float, Interval] = {}
        notes: dict[str, str] = {"signal_type": self.cfg.signal_type}
        if self.cfg.use_historical:
            params = {**base, "start": _iso(now - HISTORICAL_WINDOW_SECONDS), "end": _iso(now)}
            try:
                body = self._get(HISTORICAL_PATH, params)
            except SourceError as exc:
                if isinstance(exc, (LoginError, MissingSecret)) or exc.reason not in OPTIONAL_FAILURES:
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
