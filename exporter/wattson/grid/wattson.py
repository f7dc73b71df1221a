"""Another wattson as a grid source: a host of a fleet reads a grid hub instead of the upstream APIs.

`GET <base_url>/api/v1/grid?signal=<signal>&zone=<zone>` answers the hub's timeline for one signal and
zone (`wattson.grid.hub`): intervals with the value, its unit and currency, the upstream source serving it
(electricitymaps, entsoe, or the hub's own fallback), and its estimated and forecast marks. The host keeps
that provenance: each interval's `origin` is the upstream source, so `wattson_grid_signal_info` names it,
with `via="wattson"`.

The request carries the last answer's ETag in If-None-Match; a 304 means nothing changed, and the last
intervals are returned again as a fresh fetch. A 404 whose body lists what the hub serves means this
signal or zone is not one of them: `wrong_zone` (and, at start, `preflight` makes it a config error).
Basic auth (`username` with `password_env` or `password_file`, read at every fetch so a rotated password
is picked up) and a private CA (`ca_file`) are optional; the password never appears in the config, in
logs or in metrics.

Prices arrive as the hub exports them, its retail adjustments included; this source's own `adder_per_kwh`
and `multiplier` apply on top, as for any price source (leave them unset to price exactly as the hub).
"""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..model import PriceAdjustments, SourceConfigBase
from .base import FetchResult, Interval, Signal, SourceError
from .http import HttpClient, decode_json, read_secret
from .hub import CARBON_UNIT, PATH, VERSION
from .limits import MAX_GRAMS_PER_KWH
from .response import ApiModel, SameZone, asked, fault, parse, show

NAME = "wattson"
DEFAULT_POLL_SECONDS = 60.0
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_PASSWORD_ENV = "WATTSON_HUB_PASSWORD"
LATEST_TIME = 1e11  # year 5138: anything later is not a UNIX time in seconds
# A source name becomes a label value: one word, as source types are named, so a broken hub cannot blow
# up the number of series.
SOURCE_NAME = r"^[a-z][a-z0-9_-]{0,39}$"
WHERE = f"{NAME}: GET {PATH}"


class _HubConfig(SourceConfigBase):
    type: Literal["wattson"]
    base_url: str = Field(description="The hub: the URL of the wattson serving /api/v1/grid, e.g. "
                          "https://grid-hub.example.net:9874.")
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0, le=120,
                                   description="HTTP timeout per request.")
    poll_interval_seconds: float = Field(  # type: ignore[assignment]
        default=DEFAULT_POLL_SECONDS, ge=1, description="How often to ask the hub (an unchanged answer costs "
        "a 304 without a body).")
    username: str | None = Field(default=None, min_length=1,
                                 description="Basic auth user, when the hub's web config requires one.")
    password_env: str | None = Field(default=DEFAULT_PASSWORD_ENV,
                                     description="Environment variable holding the basic auth password.")
    password_file: str | None = Field(default=None, description="File holding the basic auth password.")
    ca_file: str | None = Field(default=None, description="PEM file of the CA that signed the hub's certificate "
                                "(a private CA); default: the system's trusted CAs.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("the hub's URL takes no query or fragment")
        return v

    @model_validator(mode="after")
    def _auth_is_complete(self) -> _HubConfig:
        if self.username is None and self.password_file is not None:
            raise ValueError("password_file is set but username is not: basic auth needs both")
        return self


class CarbonConfig(_HubConfig):
    """A grid hub serving carbon intensity."""


class PriceConfig(_HubConfig, PriceAdjustments):
    """A grid hub serving prices (its own adjustments included; these apply on top)."""


# --- the hub's answer ---------------------------------------------------------------------------------


def _time(value: float) -> float:
    if not math.isfinite(value) or not 0 < value < LATEST_TIME:
        raise fault("malformed", f"= {show(value)} is not a UNIX time in seconds")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise fault("invalid_value", f"= {show(value)} is not a finite number")
    return value


def _same_signal(value: str, info: ValidationInfo) -> str:
    want = asked(info, "signal")
    if value != want:
        raise fault("wrong_zone", f"is {show(value)}, expected {show(want)}")
    return value


Time = Annotated[float, AfterValidator(_time)]


class HubInterval(ApiModel):
    """One piece of the hub's timeline: [start, end), its value and where the value came from."""

    start: Time
    end: Time
    value: Annotated[float, AfterValidator(_finite)]
    unit: str
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None
    source: Annotated[str, StringConstraints(pattern=SOURCE_NAME)]
    estimated: bool
    forecast: bool
    fetched_at: Time

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> HubInterval:
        if self.end <= self.start:
            raise fault("malformed", f"end {self.end:.0f} is not after start {self.start:.0f}")
        if asked(info, "signal") == "carbon":
            if self.unit != CARBON_UNIT or self.currency is not None:
                raise fault("invalid_value", f"unit {show(self.unit)} is not {CARBON_UNIT}")
            if not 0 <= self.value <= MAX_GRAMS_PER_KWH:
                raise fault("invalid_value", f"value {show(self.value)} gCO2e/kWh is outside "
                                             f"0..{MAX_GRAMS_PER_KWH:g}")
        else:
            if self.currency is None:
                raise fault("missing_field", "currency of a price is null")
            if self.unit != f"{self.currency}/kWh":
                raise fault("invalid_value", f"unit {show(self.unit)} is not {self.currency}/kWh")
        return self


class HubSignal(ApiModel):
    """The timeline of one signal in one zone."""

    signal: Annotated[str, AfterValidator(_same_signal)]
    zone: SameZone
    intervals: list[HubInterval]


def _version(value: Any) -> int:
    """A whole number (JSON numbers arrive as Decimal), and the one this wattson reads."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value != VERSION:
        raise fault("malformed", f"is {show(value)}: this wattson reads version {VERSION} (upgrade it, or the hub)")
    return VERSION


class HubAnswer(ApiModel):
    """GET /api/v1/grid. `version` comes first: an answer in another version says so before anything else."""

    version: Annotated[int, PlainValidator(_version)]
    generated_at: Time
    signals: list[HubSignal]


# --- the source ---------------------------------------------------------------------------------------


class WattsonSource:
    """One chain's signal and zone, read from a grid hub."""

    name = NAME

    def __init__(self, cfg: CarbonConfig | PriceConfig, zone: str, signal: Signal) -> None:
        self.signal: Signal = signal
        self.zone = zone
        self.api_zone = cfg.zone or zone
        self.cfg = cfg
        self.poll_interval_seconds = cfg.poll_interval_seconds
        self.http = HttpClient(NAME, cfg.base_url, cfg.timeout_seconds)
        self.http.session.headers["Accept"] = "application/json"
        if cfg.ca_file is not None:
            if not Path(cfg.ca_file).is_file():
                raise ValueError(f"ca_file {cfg.ca_file}: no such file")
            self.http.session.verify = cfg.ca_file
        self._password: str | None = None
        self._etag: str | None = None
        self._last: FetchResult | None = None  # what the answer with _etag held

    def secrets(self) -> tuple[str, ...]:
        return (self._password,) if self._password else ()

    def _auth(self) -> tuple[str, str] | None:
        """Basic auth, the password re-read each time (a rotated one is picked up); MissingSecret without one."""
        if self.cfg.username is None:
            return None
        password = read_secret(NAME, self.cfg.password_env, self.cfg.password_file, required=True,
                               what="password")
        assert password is not None
        self._password = password
        self.http.secrets = self.secrets()
        return self.cfg.username, password

    def fetch(self, now: float) -> FetchResult:
        headers = {"If-None-Match": self._etag} if self._etag is not None and self._last is not None else {}
        resp = self.http.request("GET", PATH, params={"signal": self.signal, "zone": self.api_zone},
                                 headers=headers, auth=self._auth(), ok_statuses=(200, 304, 404))
        if resp.status_code == 304:
            if self._last is None:
                raise SourceError("malformed", f"{WHERE}: HTTP 304 to a request without If-None-Match")
            return self._last  # unchanged since the last answer: its intervals, fetched afresh
        if resp.status_code == 404:
            raise self._not_served(resp.content)
        result = self.parse(decode_json(resp.content, WHERE), now)
        self._etag, self._last = resp.headers.get("ETag"), result
        return result

    def preflight(self) -> None:
        """One request before the chain starts. SourceError with reason wrong_zone: the hub does not serve
        this signal or zone (a config error: it never will); any other reason: not answering as it should
        right now, which the chain's fallback covers. The answer is kept: the first poll costs a 304."""
        self.fetch(time.time())

    def _not_served(self, body: bytes) -> SourceError:
        """A 404: the hub's own "not served" answer lists what it serves (wrong_zone); any other 404 (not a
        wattson, or one without the hub API) is an http_4xx."""
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("served"), list):
            offered = ", ".join(f"{s.get('signal')}/{s.get('zone')}" for s in data["served"][:8]
                                if isinstance(s, dict)) or "nothing"
            return SourceError("wrong_zone", f"{WHERE}: the hub does not serve {self.signal} for zone "
                                             f"{self.api_zone} (it serves {offered[:200]})")
        snippet = body[:160].decode("utf-8", "replace").replace("\n", " ").strip()
        return SourceError("http_4xx", f"{WHERE}: HTTP 404 (no grid hub API at this URL?)"
                                       + (f": {snippet}" if snippet else ""))

    def parse(self, body: Any, now: float) -> FetchResult:
        """The hub's answer as intervals whose origin is the upstream source; SourceError when it is not
        what was asked for or not well formed."""
        answer = parse(HubAnswer, body, WHERE, {"signal": self.signal, "zone": self.api_zone})
        if not answer.signals:
            raise SourceError("no_data", f"{WHERE}: field 'signals' holds no entry for {self.signal} "
                                         f"in zone {self.api_zone}")
        if len(answer.signals) > 1:
            raise SourceError("malformed", f"{WHERE}: field 'signals' holds {len(answer.signals)} entries "
                                           f"for {self.signal} in zone {self.api_zone}, expected one")
        rows = sorted(answer.signals[0].intervals, key=lambda r: r.start)
        if not rows:
            raise SourceError("no_data", f"{WHERE}: the hub has no {self.signal} data for zone {self.api_zone} "
                                         "(every source of its chain down or stale)")
        for a, b in zip(rows, rows[1:], strict=False):
            if b.start < a.end:
                raise SourceError("malformed", f"{WHERE}: intervals overlap at start {b.start:.0f}")
        notes: dict[str, str] = {}
        currency = None
        if self.signal == "price":
            # One chain, one currency: should the hub's chain mix them, keep the one in force now.
            currencies = {r.currency for r in rows}
            current = next((r for r in rows if r.start <= now < r.end), rows[0])
            currency = current.currency
            if len(currencies) > 1:
                rows = [r for r in rows if r.currency == currency]
                notes["currency"] = f"the hub's timeline mixes {', '.join(sorted(str(c) for c in currencies))}; " \
                                    f"kept {currency}"
        intervals = tuple(Interval(r.start, r.end, r.value, r.estimated, r.forecast, origin=r.source) for r in rows)
        return FetchResult(intervals=intervals, currency=currency, notes=notes)


def build_carbon(cfg: CarbonConfig, zone: str) -> WattsonSource:
    return WattsonSource(cfg, zone, "carbon")


def build_price(cfg: PriceConfig, zone: str) -> WattsonSource:
    return WattsonSource(cfg, zone, "price")
