"""WattTime v3 source: login/token lifecycle, unit conversion and validation over real sockets."""

from __future__ import annotations

import base64
import threading
import time
from datetime import datetime, timezone

import pytest

from tests.fixture_server import FixtureServer, Request, Response, fixture, json_response
from wattson.grid import watttime
from wattson.grid.base import LBS_PER_MWH_TO_G_PER_KWH, Interval, SourceError

USER = "wattson-test"
PASSWORD = "CANARY-WT-PASS-5e1d"
PASSWORD_ENV = "WATTSON_TEST_WT_PASSWORD"
TOKEN = "CANARY-WT-TOKEN-0001.eyJhbGciOiJIUzI1NiJ9.fixture"  # as in fixtures/watttime/login.json
NOW = datetime(2025, 1, 15, 12, 20, tzinfo=timezone.utc).timestamp()
LOGIN, FORECAST, HISTORICAL = "/login", "/v3/forecast", "/v3/historical"


def at(minute: int) -> float:
    return datetime(2025, 1, 15, 12, minute, tzinfo=timezone.utc).timestamp()


def wt(name: str, status: int = 200, **headers: str) -> Response:
    return json_response(fixture("watttime", name), status, **headers)


class FakeClock:
    """Monotonic seconds the test moves by hand, for token-age decisions."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TokenServer:
    """Login hands out tok-1, tok-2, ...; data routes accept only tokens in `accepted`."""

    def __init__(self, forecast: str = "forecast.json", historical: str = "historical.json") -> None:
        self.issued: list[str] = []
        self.accepted: set[str] | None = None  # None: accept every issued token
        self.forecast, self.historical = forecast, historical

    def login(self, req: Request) -> Response:
        token = f"{TOKEN}-{len(self.issued) + 1}"
        self.issued.append(token)
        return json_response(f'{{"token": "{token}"}}')

    def data(self, name_attr: str) -> object:
        def handler(req: Request) -> Response:
            token = req.headers.get("authorization", "").removeprefix("Bearer ")
            ok = token in self.issued if self.accepted is None else token in self.accepted
            return wt(getattr(self, name_attr)) if ok else wt("error_403.json", 403)
        return handler

    def routes(self) -> dict:
        return {LOGIN: self.login, FORECAST: self.data("forecast"), HISTORICAL: self.data("historical")}


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)




def make(server: FixtureServer, clock: FakeClock | None = None, **cfg: object) -> watttime.WattTimeSource:
    conf = watttime.Config.model_validate({"type": "watttime", "base_url": server.base_url, "username": USER,
                                           "password_env": PASSWORD_ENV, **cfg})
    return watttime.build(conf, "CAISO_NORTH", clock or FakeClock())


def static_routes(**override: Response) -> dict:
    routes = {LOGIN: wt("login.json"), FORECAST: wt("forecast.json"), HISTORICAL: wt("historical.json")}
    routes.update({{"login": LOGIN, "forecast": FORECAST, "historical": HISTORICAL}[k]: v
                   for k, v in override.items()})
    return routes


def fetch_error(server: FixtureServer, routes: dict, **cfg: object) -> SourceError:
    server.routes.update(routes)
    src = make(server, **cfg)
    with pytest.raises(SourceError) as info:
        src.fetch(NOW)
    msg = str(info.value)
    assert PASSWORD not in msg and TOKEN not in msg
    assert msg.startswith("watttime: ") and "\n" not in msg
    return info.value


def test_conversion_factor_is_exact() -> None:
    assert LBS_PER_MWH_TO_G_PER_KWH == 0.45359237
    assert 1000 * LBS_PER_MWH_TO_G_PER_KWH == 453.59237


def test_defaults() -> None:
    cfg = watttime.Config(type="watttime", username=USER)
    assert cfg.base_url == "https://api.watttime.org"
    assert cfg.password_env == "WATTTIME_PASSWORD" and cfg.signal_type == "co2_moer"
    src = watttime.build(cfg, "CAISO_NORTH")
    assert src.poll_interval_seconds == 300 and (src.name, src.signal) == ("watttime", "carbon")


def test_parse_forecast_and_historical(server: FixtureServer) -> None:
    server.routes.update(static_routes())
    src = make(server)
    result = src.fetch(NOW)
    g = LBS_PER_MWH_TO_G_PER_KWH
    assert result.intervals == (
        Interval(at(5), at(10), 900 * g),
        # historical 12:10 is null: skipped
        Interval(at(15), at(20), 920 * g),
        # historical (settled) 990 wins over the forecast's real-time 1000 for 12:20
        Interval(at(20), at(25), 990 * g),
        Interval(at(25), at(30), 1100.5 * g, forecast=True),
        # forecast 12:30 is null: skipped
        Interval(at(35), at(40), 950 * g, forecast=True),
    )
    assert result.currency is None
    assert set(src.secrets()) == {PASSWORD, TOKEN}


def test_forecast_only_exact_values(server: FixtureServer) -> None:
    server.routes.update(static_routes())
    result = make(server, use_historical=False).fetch(NOW)
    first = result.intervals[0]
    # The forecast's first point is the real-time value: not flagged as a forecast.
    assert first == Interval(at(20), at(25), 453.59237, estimated=False, forecast=False)
    assert [i.forecast for i in result.intervals] == [False, True, True]
    assert HISTORICAL not in [r.path for r in server.requests]


def test_period_from_meta(server: FixtureServer) -> None:
    server.routes.update(static_routes(forecast=wt("forecast_hourly.json")))
    result = make(server, use_historical=False).fetch(NOW)
    assert result.intervals[0].end - result.intervals[0].start == 3600


def test_requests_sent(server: FixtureServer) -> None:
    server.routes.update(static_routes())
    make(server).fetch(NOW)
    login, hist, fc = server.requests
    assert login.path == LOGIN
    assert login.headers["authorization"] == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert hist.path == HISTORICAL and fc.path == FORECAST
    for r in (hist, fc):
        assert r.headers["authorization"] == f"Bearer {TOKEN}"
        assert r.query["region"] == ["CAISO_NORTH"] and r.query["signal_type"] == ["co2_moer"]
    assert hist.query["start"] == ["2025-01-15T11:20:00+00:00"]
    assert hist.query["end"] == ["2025-01-15T12:20:00+00:00"]


def test_token_reused_then_renewed_before_expiry(server: FixtureServer) -> None:
    tokens = TokenServer()
    server.routes.update(tokens.routes())
    clock = FakeClock()
    src = make(server, clock, use_historical=False)
    src.fetch(NOW)
    clock.t += 24 * 60  # younger than the renewal age: reused
    src.fetch(NOW)
    assert src.logins == 1
    clock.t += 2 * 60  # 26 min old: renewed before the 30 min expiry, without waiting for a 401
    src.fetch(NOW)
    assert src.logins == 2
    bearer = [r.headers.get("authorization") for r in server.requests if r.path == FORECAST]
    assert bearer == [f"Bearer {tokens.issued[0]}"] * 2 + [f"Bearer {tokens.issued[1]}"]
    assert tokens.issued[1] in src.secrets() and tokens.issued[0] not in src.secrets()


def test_relogin_once_on_403_with_cached_token(server: FixtureServer) -> None:
    tokens = TokenServer()
    server.routes.update(tokens.routes())
    clock = FakeClock()
    src = make(server, clock, use_historical=False)
    src.fetch(NOW)
    tokens.accepted = {f"{TOKEN}-2"}  # server revokes tok-1 early
    clock.t += 60
    result = src.fetch(NOW)
    assert src.logins == 2
    assert [r.path for r in server.requests] == [LOGIN, FORECAST, FORECAST, LOGIN, FORECAST]
    assert result.intervals[0].value == 453.59237


def test_persistent_403_fails_after_one_relogin(server: FixtureServer) -> None:
    tokens = TokenServer()
    server.routes.update(tokens.routes())
    clock = FakeClock()
    src = make(server, clock, use_historical=False)
    src.fetch(NOW)
    tokens.accepted = set()
    clock.t += 60
    with pytest.raises(SourceError) as info:
        src.fetch(NOW)
    assert info.value.reason == "auth" and "/v3/forecast" in str(info.value)
    assert src.logins == 2  # exactly one re-login, no loop
    assert TOKEN not in str(info.value) and PASSWORD not in str(info.value)


def test_403_on_fresh_token_does_not_relogin(server: FixtureServer) -> None:
    tokens = TokenServer()
    tokens.accepted = set()
    server.routes.update(tokens.routes())
    err = fetch_error(server, {}, use_historical=False)
    assert err.reason == "auth"
    assert [r.path for r in server.requests] == [LOGIN, FORECAST]


def test_historical_unavailable_is_optional(server: FixtureServer) -> None:
    server.routes.update(static_routes(historical=wt("error_403.json", 403)))
    result = make(server).fetch(NOW)
    assert [i.value for i in result.intervals][0] == 453.59237
    assert "HTTP 403" in result.notes["historical"]


def test_login_failure_is_not_optional(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(login=json_response(f'{{"error": "bad password {PASSWORD}"}}', 401)))
    assert err.reason == "auth" and "/login" in str(err) and "<redacted>" in str(err)
    assert [r.path for r in server.requests] == [LOGIN]


def test_login_without_token(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(login=wt("login_no_token.json")))
    assert err.reason == "missing_field" and "'token'" in str(err)


def test_missing_password(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV)
    err = fetch_error(server, static_routes())
    assert err.reason == "auth" and PASSWORD_ENV in str(err) and "password" in str(err)
    assert server.requests == []


def test_password_from_file(server: FixtureServer, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    server.routes.update(static_routes())
    make(server, password_env=None, password_file=str(tmp_path / "pw"), use_historical=False).fetch(NOW)
    expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert server.requests[0].headers["authorization"] == f"Basic {expected}"


@pytest.mark.parametrize("name,reason,words", [
    ("forecast_percentile.json", "invalid_value", ["meta.units", "'percentile'", "lbs_co2_per_mwh"]),
    ("forecast_wrong_region.json", "wrong_zone", ["meta.region", "'PJM_NJ'", "CAISO_NORTH"]),
    ("forecast_wrong_signal.json", "invalid_value", ["meta.signal_type", "health_damage"]),
    ("forecast_negative.json", "invalid_value", ["data[1]", "'value'", "-40"]),
    ("forecast_absurd.json", "invalid_value", ["data[1]", "'value'", "25000"]),
    ("forecast_missing_meta.json", "missing_field", ["/v3/forecast", "'meta'"]),
    ("forecast_missing_point_time.json", "missing_field", ["data[1]", "'point_time'"]),
    ("forecast_truncated.json", "malformed", ["/v3/forecast", "not valid JSON"]),
])
def test_validation_errors(server: FixtureServer, name: str, reason: str, words: list[str]) -> None:
    err = fetch_error(server, static_routes(forecast=wt(name)), use_historical=False)
    assert err.reason == reason
    for w in words:
        assert w in str(err)


def test_percentile_in_historical_is_refused_too(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(historical=wt("forecast_percentile.json")))
    assert err.reason == "invalid_value" and "/v3/historical" in str(err)


def test_all_null_is_no_data(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(forecast=wt("forecast_all_null.json")), use_historical=False)
    assert err.reason == "no_data"


def test_http_500(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(forecast=wt("error_500.json", 500)))
    assert err.reason == "http_5xx" and "/v3/forecast" in str(err)


def test_429_carries_retry_after(server: FixtureServer) -> None:
    err = fetch_error(server, static_routes(forecast=wt("error_429.json", 429, **{"Retry-After": "30"})),
                      use_historical=False)
    assert err.reason == "rate_limited" and err.retry_after == 30.0


def test_token_echoed_in_error_is_redacted(server: FixtureServer) -> None:
    echo = json_response(f'{{"error": "token {TOKEN} is not allowed here"}}', 400)
    err = fetch_error(server, static_routes(forecast=echo), use_historical=False)
    assert err.reason == "http_4xx" and "<redacted>" in str(err)


def test_timeout(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    answered = threading.Event()

    def slow(req: Request) -> Response:
        time.sleep(0.3)
        answered.set()
        return 200, {}, b""

    # The client gives up after 0.1 s, so the server's late answer hits a closed socket: expected, keep it quiet.
    monkeypatch.setattr(server._httpd, "handle_error", lambda request, client_address: None)
    started = time.monotonic()
    err = fetch_error(server, static_routes(forecast=slow), use_historical=False, timeout_seconds=0.1)
    assert time.monotonic() - started < 0.3
    assert err.reason == "timeout" and "/v3/forecast" in str(err)
    assert answered.wait(2)
    time.sleep(0.05)  # let the late write fail while handle_error is still silenced


def test_config_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        watttime.Config(type="watttime")  # type: ignore[call-arg]  # username required
    with pytest.raises(ValidationError):
        watttime.Config(type="watttime", username=USER, signal_type="health_damage")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        watttime.Config(type="watttime", username=USER, password="inline")  # type: ignore[call-arg]
