"""Electricity Maps source against recorded-shape fixtures served over real sockets."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.fixture_server import FixtureServer, Request, Response, fixture, json_response
from wattson.grid import electricitymaps
from wattson.grid.base import Interval, SourceError

CANARY_KEY = "CANARY-EM-KEY-7f3a9c"  # also echoed by fixtures/electricitymaps/error_401.json
KEY_ENV = "WATTSON_TEST_EM_KEY"
NOW = datetime(2025, 1, 15, 12, 20, tzinfo=timezone.utc).timestamp()
HISTORY = "/v3/carbon-intensity/history"
LATEST = "/v3/carbon-intensity/latest"
FORECAST = "/v3/carbon-intensity/forecast"


def ts(hour: int) -> float:
    return datetime(2025, 1, 15, hour, tzinfo=timezone.utc).timestamp()


def em(name: str, status: int = 200, **headers: str) -> Response:
    return json_response(fixture("electricitymaps", name), status, **headers)


def ok_routes(**override: Response) -> dict[str, Response]:
    routes = {HISTORY: em("history.json"), LATEST: em("latest.json"), FORECAST: em("forecast.json")}
    routes.update({{"history": HISTORY, "latest": LATEST, "forecast": FORECAST}[k]: v for k, v in override.items()})
    return routes


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, CANARY_KEY)




def serve(server: FixtureServer, routes: dict) -> FixtureServer:
    server.routes.update(routes)
    return server


def make(server: FixtureServer, **cfg: object) -> electricitymaps.ElectricityMapsSource:
    conf = electricitymaps.Config(type="electricitymaps", base_url=server.base_url, api_key_env=KEY_ENV,
                                  **cfg)  # type: ignore[arg-type]
    return electricitymaps.build(conf, "DE")


def fetch_error(server: FixtureServer, routes: dict, **cfg: object) -> SourceError:
    serve(server, routes)
    with pytest.raises(SourceError) as info:
        make(server, **cfg).fetch(NOW)
    assert CANARY_KEY not in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith("electricitymaps: ")
    return info.value


def test_defaults() -> None:
    cfg = electricitymaps.Config(type="electricitymaps")
    assert cfg.base_url == "https://api.electricitymap.org"
    assert cfg.api_key_env == "ELECTRICITYMAPS_API_KEY"
    assert cfg.emission_factor_type == "lifecycle" and cfg.use_forecast is True
    src = electricitymaps.build(cfg, "DE")
    assert 300 <= src.poll_interval_seconds <= 900
    assert (src.name, src.signal, src.zone) == ("electricitymaps", "carbon", "DE")


def test_parse_history_latest_forecast(server: FixtureServer) -> None:
    serve(server, ok_routes())
    src = make(server)
    result = src.fetch(NOW)
    assert result.intervals == (
        Interval(ts(8), ts(9), 412.0, estimated=False, forecast=False),
        # 09:00 is null in history: skipped, never turned into 0
        Interval(ts(10), ts(11), 398.5, estimated=False, forecast=False),
        Interval(ts(11), ts(12), 371.0, estimated=True, forecast=False),
        # latest (362, fresher) replaces history's 350 for 12:00; forecast's 355 does not replace it
        Interval(ts(12), ts(13), 362.0, estimated=True, forecast=False),
        Interval(ts(13), ts(14), 340.0, estimated=False, forecast=True),
        # 14:00 forecast is null: skipped
        Interval(ts(15), ts(16), 318.25, estimated=False, forecast=True),
    )
    assert result.currency is None
    assert "forecast" not in result.notes
    assert src.secrets() == (CANARY_KEY,)


def test_auth_header_zone_and_emission_factor_sent(server: FixtureServer) -> None:
    serve(server, ok_routes())
    make(server, emission_factor_type="direct").fetch(NOW)
    reqs = list(server.requests)
    assert sorted(r.path for r in reqs) == sorted([HISTORY, LATEST, FORECAST])
    for r in reqs:
        assert r.headers["auth-token"] == CANARY_KEY
        assert r.query["zone"] == ["DE"]
        assert r.query["emissionFactorType"] == ["direct"]
        assert CANARY_KEY not in r.path and CANARY_KEY not in str(r.query)


def test_zone_override_is_the_api_zone(server: FixtureServer) -> None:
    serve(server, ok_routes())
    conf = electricitymaps.Config(type="electricitymaps", base_url=server.base_url, api_key_env=KEY_ENV,
                                  zone="FR", use_forecast=False)
    src = electricitymaps.build(conf, "DE-label")
    with pytest.raises(SourceError) as info:  # history fixture says DE, the API zone is FR
        src.fetch(NOW)
    assert server.requests[0].query["zone"] == ["FR"]
    assert info.value.reason == "wrong_zone"
    assert src.zone == "DE-label"


def test_use_forecast_false_skips_forecast_call(server: FixtureServer) -> None:
    serve(server, ok_routes())
    result = make(server, use_forecast=False).fetch(NOW)
    assert FORECAST not in [r.path for r in server.requests]
    assert all(not i.forecast for i in result.intervals)


@pytest.mark.parametrize("status,body", [(403, "error_403_forecast.json"), (404, "error_403_forecast.json"),
                                         (429, "error_429.json"), (500, "error_500.json")])
def test_forecast_failure_does_not_fail_fetch(server: FixtureServer, status: int, body: str) -> None:
    serve(server, ok_routes(forecast=em(body, status)))
    result = make(server).fetch(NOW)
    assert [i.start for i in result.intervals] == [ts(8), ts(10), ts(11), ts(12)]
    assert f"HTTP {status}" in result.notes["forecast"]


def test_forecast_with_wrong_content_fails_fetch(server: FixtureServer) -> None:
    bad = json_response(b'{"zone": "FR", "forecast": []}')
    err = fetch_error(server, ok_routes(forecast=bad))
    assert err.reason == "wrong_zone" and "forecast" in str(err)


def test_null_latest_keeps_history(server: FixtureServer) -> None:
    serve(server, ok_routes(latest=em("latest_null.json")))
    result = make(server, use_forecast=False).fetch(NOW)
    assert result.intervals[-1] == Interval(ts(12), ts(13), 350.0, estimated=True, forecast=False)


def test_all_null_is_no_data(server: FixtureServer) -> None:
    err = fetch_error(server, ok_routes(history=em("history_all_null.json"), latest=em("latest_null.json")),
                      use_forecast=False)
    assert err.reason == "no_data"


@pytest.mark.parametrize("override,reason,words", [
    ({"latest": "latest_wrong_zone.json"}, "wrong_zone", ["/v3/carbon-intensity/latest", "'zone'", "'FR'"]),
    ({"history": "history_negative.json"}, "invalid_value", ["history[0]", "carbonIntensity", "-12"]),
    ({"history": "history_absurd.json"}, "invalid_value", ["history[0]", "carbonIntensity", "51000"]),
    ({"history": "history_missing_datetime.json"}, "missing_field", ["history[0]", "'datetime'"]),
    ({"history": "history_missing_list.json"}, "missing_field", ["/v3/carbon-intensity/history", "'history'"]),
    ({"history": "history_truncated.json"}, "malformed", ["/v3/carbon-intensity/history", "not valid JSON"]),
])
def test_validation_errors(server: FixtureServer, override: dict[str, str], reason: str, words: list[str]) -> None:
    err = fetch_error(server, ok_routes(**{k: em(v) for k, v in override.items()}))
    assert err.reason == reason
    msg = str(err)
    assert msg.startswith("electricitymaps: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_http_500(server: FixtureServer) -> None:
    err = fetch_error(server, ok_routes(latest=em("error_500.json", 500)))
    assert err.reason == "http_5xx" and "/v3/carbon-intensity/latest" in str(err) and "500" in str(err)


def test_history_failing_only_costs_past_hours(server: FixtureServer) -> None:
    serve(server, ok_routes(history=em("error_500.json", 500)))
    result = make(server).fetch(NOW)
    assert "history" in result.notes and "http_5xx" in result.notes["history"]
    assert result.intervals  # latest and forecast still serve


def test_429_carries_retry_after(server: FixtureServer) -> None:
    err = fetch_error(server, ok_routes(latest=em("error_429.json", 429, **{"Retry-After": "120"})))
    assert err.reason == "rate_limited"
    assert err.retry_after == 120.0


def test_401_with_echoed_key_is_redacted(server: FixtureServer) -> None:
    err = fetch_error(server, ok_routes(latest=em("error_401.json", 401)))
    assert err.reason == "auth"
    assert "<redacted>" in str(err)


def test_timeout(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    answered = threading.Event()

    def slow(req: Request) -> Response:
        time.sleep(0.3)
        answered.set()
        return 200, {}, b""

    # The client gives up after 0.1 s, so the server's late answer hits a closed socket: expected, keep it quiet.
    monkeypatch.setattr(server._httpd, "handle_error", lambda request, client_address: None)
    started = time.monotonic()
    err = fetch_error(server, ok_routes(latest=slow), timeout_seconds=0.1)
    assert time.monotonic() - started < 0.3
    assert err.reason == "timeout" and "/v3/carbon-intensity/latest" in str(err)
    assert answered.wait(2)
    time.sleep(0.05)  # let the late write fail while handle_error is still silenced


def test_missing_key(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    serve(server, ok_routes())
    src = make(server)
    with pytest.raises(SourceError) as info:
        src.fetch(NOW)
    assert server.requests == []  # nothing sent without a key
    assert info.value.reason == "auth" and KEY_ENV in str(info.value)


def test_key_from_file(server: FixtureServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "em.key"
    key_file.write_text(CANARY_KEY + "\n")
    serve(server, ok_routes())
    conf = electricitymaps.Config(type="electricitymaps", base_url=server.base_url, api_key_env=None,
                                  api_key_file=str(key_file), use_forecast=False)
    electricitymaps.build(conf, "DE").fetch(NOW)
    assert server.requests[0].headers["auth-token"] == CANARY_KEY


def test_connection_refused() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = electricitymaps.Config(type="electricitymaps", base_url=f"http://127.0.0.1:{port}", api_key_env=KEY_ENV)
    with pytest.raises(SourceError) as info:
        electricitymaps.build(conf, "DE").fetch(NOW)
    assert info.value.reason == "connection" and CANARY_KEY not in str(info.value)


def test_config_rejects_unknown_keys_and_values() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        electricitymaps.Config(type="electricitymaps", api_key="inline-secret")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        electricitymaps.Config(type="electricitymaps", emission_factor_type="marginal")  # type: ignore[arg-type]
