"""UK Carbon Intensity API source: national array vs regional object, null actuals, errors."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from tests.fixture_server import FixtureServer, Request, Response, fixture, json_response
from wattson.grid import ukcarbonintensity as uk
from wattson.grid.base import Interval, SourceError

NOW = datetime(2025, 1, 15, 12, 20, tzinfo=timezone.utc).timestamp()
# Requests start one slot before the slot holding NOW (12:00-12:30), in the API's minute format.
NATIONAL = "/intensity/2025-01-15T11:30Z/fw24h"
REGIONAL_13 = "/regional/intensity/2025-01-15T11:30Z/fw24h/regionid/13"


def at(hour: int, minute: int) -> float:
    return datetime(2025, 1, 15, hour, minute, tzinfo=timezone.utc).timestamp()


def ci(name: str, status: int = 200, **headers: str) -> Response:
    return json_response(fixture("ukcarbonintensity", name), status, **headers)




def make(server: FixtureServer, zone: str = "GB", **cfg: object) -> uk.UkCarbonIntensitySource:
    conf = uk.Config.model_validate({"type": "ukcarbonintensity", "base_url": server.base_url, **cfg})
    return uk.build(conf, zone)


def fetch_error(server: FixtureServer, routes: dict, **cfg: object) -> SourceError:
    server.routes.update(routes)
    with pytest.raises(SourceError) as info:
        make(server, **cfg).fetch(NOW)
    msg = str(info.value)
    assert msg.startswith("ukcarbonintensity: ") and "\n" not in msg
    return info.value


def test_defaults() -> None:
    cfg = uk.Config(type="ukcarbonintensity")
    assert cfg.base_url == "https://api.carbonintensity.org.uk" and cfg.region_id is None
    src = uk.build(cfg, "GB")
    assert src.poll_interval_seconds == 1800 and src.secrets() == ()
    assert (src.name, src.signal, src.zone) == ("ukcarbonintensity", "carbon", "GB")


def test_api_timestamp_format() -> None:
    assert uk.api_timestamp(at(12, 0)) == "2025-01-15T12:00Z"


@pytest.mark.parametrize("now,expected", [
    (at(12, 20), NATIONAL),
    (at(12, 0), NATIONAL),
    (at(12, 29) + 59.9, NATIONAL),
    (at(12, 30), "/intensity/2025-01-15T12:00Z/fw24h"),
])
def test_request_path_covers_current_slot(now: float, expected: str) -> None:
    assert uk.build(uk.Config(type="ukcarbonintensity"), "GB").path(now) == expected


def test_national_actual_then_forecast(server: FixtureServer) -> None:
    server.routes[NATIONAL] = ci("national_fw24h.json")
    result = make(server).fetch(NOW)
    assert result.intervals == (
        Interval(at(11, 30), at(12, 0), 263.0, estimated=False, forecast=False),  # actual used
        Interval(at(12, 0), at(12, 30), 255.0, estimated=False, forecast=True),  # actual null: forecast
        Interval(at(12, 30), at(13, 0), 240.0, estimated=False, forecast=True),
        # 13:00 has neither forecast nor actual: skipped, never 0
        Interval(at(13, 30), at(14, 0), 231.0, estimated=False, forecast=True),
    )
    assert result.notes["scope"] == "national"
    (req,) = server.requests
    assert req.path == NATIONAL and req.headers["accept"] == "application/json"


@pytest.mark.parametrize("name", ["regional_fw24h.json", "regional_fw24h_list.json"])
def test_regional_object_forecast_only(server: FixtureServer, name: str) -> None:
    server.routes[REGIONAL_13] = ci(name)
    result = make(server, zone="GB-london", region_id=13).fetch(NOW)
    assert result.intervals == (
        Interval(at(11, 30), at(12, 0), 187.0, forecast=True),
        Interval(at(12, 0), at(12, 30), 174.0, forecast=True),
        Interval(at(13, 0), at(13, 30), 162.5, forecast=True),
    )
    assert result.notes["scope"] == "region 13"
    assert [r.path for r in server.requests] == [REGIONAL_13]


def test_regional_wrong_region(server: FixtureServer) -> None:
    err = fetch_error(server, {REGIONAL_13: ci("regional_wrong_region.json")}, region_id=13)
    assert err.reason == "wrong_zone" and "data.regionid" in str(err) and "3" in str(err)


def test_regional_answer_with_national_shape(server: FixtureServer) -> None:
    err = fetch_error(server, {REGIONAL_13: ci("national_fw24h.json")}, region_id=13)
    assert err.reason == "malformed" and "region object" in str(err)


def test_national_answer_with_object_shape(server: FixtureServer) -> None:
    err = fetch_error(server, {NATIONAL: ci("national_as_object.json")})
    assert err.reason == "malformed" and "not an array" in str(err)


@pytest.mark.parametrize("route,name,cfg,reason,words", [
    (NATIONAL, "national_negative.json", {}, "invalid_value", ["data[0]", "intensity.actual", "-4"]),
    (NATIONAL, "national_absurd.json", {}, "invalid_value", ["data[2]", "intensity.forecast", "9999"]),
    (NATIONAL, "national_missing_to.json", {}, "missing_field", ["data[1]", "'to'"]),
    (NATIONAL, "national_missing_forecast.json", {}, "missing_field", ["data[1]", "'forecast'"]),
    (NATIONAL, "national_end_before_start.json", {}, "invalid_value", ["data[1]", "'to' is not after 'from'"]),
    (NATIONAL, "national_bad_timestamp.json", {}, "malformed", ["from", "15/01/2025"]),
    (NATIONAL, "national_truncated.json", {}, "malformed", [NATIONAL, "not valid JSON"]),
    (NATIONAL, "national_all_null.json", {}, "no_data", [NATIONAL]),
    (REGIONAL_13, "regional_missing_data.json", {"region_id": 13}, "missing_field", ["'data'"]),
])
def test_validation_errors(server: FixtureServer, route: str, name: str, cfg: dict, reason: str,
                           words: list[str]) -> None:
    err = fetch_error(server, {route: ci(name)}, **cfg)
    assert err.reason == reason
    for w in words:
        assert w in str(err)


@pytest.mark.parametrize("name,status,reason", [
    ("error_400.json", 400, "http_4xx"), ("error_500.json", 500, "http_5xx"),
])
def test_http_errors(server: FixtureServer, name: str, status: int, reason: str) -> None:
    err = fetch_error(server, {NATIONAL: ci(name, status)})
    assert err.reason == reason and f"HTTP {status}" in str(err) and "/intensity/" in str(err)


def test_429_carries_retry_after(server: FixtureServer) -> None:
    err = fetch_error(server, {NATIONAL: ci("error_429.json", 429, **{"Retry-After": "90"})})
    assert err.reason == "rate_limited" and err.retry_after == 90.0


def test_timeout(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    answered = threading.Event()

    def slow(req: Request) -> Response:
        time.sleep(0.3)
        answered.set()
        return 200, {}, b""

    # The client gives up after 0.1 s, so the server's late answer hits a closed socket: expected, keep it quiet.
    monkeypatch.setattr(server._httpd, "handle_error", lambda request, client_address: None)
    started = time.monotonic()
    err = fetch_error(server, {NATIONAL: slow}, timeout_seconds=0.1)
    assert time.monotonic() - started < 0.3
    assert err.reason == "timeout"
    assert answered.wait(2)
    time.sleep(0.05)  # let the late write fail while handle_error is still silenced


@pytest.mark.parametrize("zone", ["GB", "uk", "GB-london", "UK-scotland"])
def test_gb_zones_accepted(zone: str) -> None:
    assert uk.build(uk.Config(type="ukcarbonintensity"), zone).zone == zone


@pytest.mark.parametrize("zone,override", [("DE", None), ("GB", "FR"), ("IE", None)])
def test_non_gb_zone_rejected_at_build(zone: str, override: str | None) -> None:
    with pytest.raises(ValueError, match="Great Britain only"):
        uk.build(uk.Config(type="ukcarbonintensity", zone=override), zone)


def test_config_validation() -> None:
    from pydantic import ValidationError

    for bad in (0, 18):
        with pytest.raises(ValidationError):
            uk.Config(type="ukcarbonintensity", region_id=bad)
    with pytest.raises(ValidationError):
        uk.Config(type="ukcarbonintensity", api_key_env="X")  # type: ignore[call-arg]  # no key for this API
