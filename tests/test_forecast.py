"""Best windows ("when is the cheapest, cleanest time to run this job?"): the search, its export, the
forecast API in the Carbon Aware SDK's shape, and `wattson forecast`.

The numbers come from the Electricity Maps fixtures served over a real socket and read by the real source.
After the source merges history, latest and forecast, the carbon data are (UTC, 15 Jan 2025, g/kWh):

    08-09  412      (history)
    09-10  -        (history: null, skipped)
    10-11  398.5    (history)
    11-12  371      (history, estimated)
    12-13  362      (latest, estimated; replaces history's 350 and the forecast's 355)
    13-14  340      (forecast)
    14-15  -        (forecast: null, skipped)
    15-16  318.25   (forecast)

At 10:20 the data end at 16:00 (horizon 5 h 40 min). 3-hour windows: the candidates are now, each interval
start and each interval end minus 3 h, from 10:20 on; every window reaching into 14-15 is not eligible:
    10:20-13:20  (40 min x 398.5 + 60 x 371 + 60 x 362 + 20 x 340) / 180 = 66720 / 180 = 370.667
    11:00-14:00  (371 + 362 + 340) / 3 = 1073 / 3 = 357.667    <- lowest
So the best 3 h window starts at 11:00 with a mean of 357.667. For 1 h: 15:00 at 318.25; for 2 h:
12:00-14:00 at (362 + 340) / 2 = 351; no 8 h window fits (horizon 5 h 40 min), nor any 4 h window (each
one would reach 14-15).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench.common import samples
from tests.fakes import ScriptedSource
from tests.fixture_server import FixtureServer, fixture, json_response
from wattson.config import ConfigError, parse_config
from wattson.exposition import Exposition
from wattson.grid import electricitymaps
from wattson.grid.base import SourceError
from wattson.grid.forecast import (
    DEFAULT_WINDOWS,
    REFRESH_SECONDS,
    Series,
    forecast_response,
    forecast_signal,
    parse_window,
    parse_windows,
    window_label,
)
from wattson.grid.registry import build_grid
from wattson.grid.signal import GridSignals, SignalChain
from wattson.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "WATTSON_TEST_EM_KEY"
H = 3600.0


def ts(hour: int, minute: int = 0) -> float:
    return datetime(2025, 1, 15, hour, minute, tzinfo=timezone.utc).timestamp()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")


def em_chain(server: FixtureServer, now: float, forecast: bool = True) -> SignalChain:
    """The real Electricity Maps source against the recorded fixtures, fetched once at `now`."""
    server.routes.update({f"/v3/carbon-intensity/{kind}": json_response(fixture("electricitymaps", f"{kind}.json"))
                          for kind in ("history", "latest", "forecast")})
    cfg = electricitymaps.Config(type="electricitymaps", base_url=server.base_url, api_key_env=KEY_ENV,
                                 use_forecast=forecast)
    chain = SignalChain("carbon", "DE", 7200.0, [electricitymaps.build(cfg, "DE")], clock=lambda: now)
    chain.poll_due()
    assert chain.state.statuses[0].up is True
    return chain


def render(grid: GridSignals, now: float) -> str:
    signals, sources = grid.now(now)
    snap = Snapshot(seq=1, timestamp=now, duration_seconds=0.0, backend="test", ready=True, gpus=(),
                    signals=signals, sources=sources, forecasts=grid.best_windows(now))
    return Exposition().render(snap).text.decode()


def series_of(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples(text) if s.name == name}


# --- window lengths ----------------------------------------------------------------------------------------


def test_window_lengths_parse_and_label() -> None:
    assert parse_window("90m") == 5400 and parse_window("3h") == 10800 and parse_window(" 1h ") == 3600
    assert [window_label(s) for s in (3600, 5400, 10800, 60 * 60 * 24)] == ["1h", "90m", "3h", "24h"]
    assert parse_windows(DEFAULT_WINDOWS) == (3600, 10800, 28800)
    for bad in ("3", "3 h", "1.5h", "-1h", "0m", "h", "3d", "1h30m", "200h"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
    with pytest.raises(ValueError, match="listed twice"):
        parse_windows(["1h", "60m"])


def test_config_key_default_and_errors() -> None:
    cfg = parse_config("")
    assert cfg.grid.forecast.windows == ["1h", "3h", "8h"]
    assert build_grid(cfg).forecast_windows == (3600, 10800, 28800)
    assert parse_config("grid:\n  forecast:\n    windows: [90m, 2h]\n").grid.forecast.window_seconds() == (5400, 7200)
    assert build_grid(parse_config("grid:\n  forecast:\n    windows: []\n")).forecast_windows == ()
    with pytest.raises(ConfigError) as info:
        parse_config("grid:\n  forecast:\n    windows: [1h, 2x]\n", "f.yml")
    assert str(info.value).startswith("f.yml:3: grid.forecast.windows[1]: window '2x'")
    assert "\n" not in str(info.value)


# --- the search, worked by hand ------------------------------------------------------------------------------


def test_best_windows_from_the_electricitymaps_forecast_match_the_hand_computation(server: FixtureServer) -> None:
    now = ts(10, 20)
    chain = em_chain(server, now)
    f = forecast_signal(chain.state, now, (H, 2 * H, 3 * H, 4 * H, 8 * H))
    assert f is not None and (f.signal, f.zone, f.source, f.currency) == ("carbon", "DE", "electricitymaps", None)
    assert f.now_value == 398.5
    got = {w.label: (w.start, w.end, w.value) for w in f.windows}
    assert set(got) == {"1h", "2h", "3h"}  # 4h and 8h: no window without the 14-15 gap fits
    assert got["1h"] == (ts(15), ts(16), 318.25)
    assert got["2h"][:2] == (ts(12), ts(14)) and got["2h"][2] == pytest.approx(351.0)
    assert got["3h"][:2] == (ts(11), ts(14)) and got["3h"][2] == pytest.approx(1073 / 3)
    assert f.horizon_end == ts(16) and f.horizon_seconds(now) == 5 * H + 40 * 60
    # every eligible 3 h window, as worked out in the module docstring
    windows = Series(chain.state.caches[0], now, ts(16)).windows(3 * H)  # type: ignore[arg-type]
    assert [(s, round(v, 3)) for s, v in windows] == [(now, 370.667), (ts(11), 357.667)]


def test_a_gap_and_the_end_of_the_data_bound_the_windows(server: FixtureServer) -> None:
    """At 12:20 only 13-14 and 15-16 lie ahead, with no data for 14-15: one-hour windows only."""
    now = ts(12, 20)
    f = forecast_signal(em_chain(server, now).state, now, (H, 3 * H, 8 * H))
    assert f is not None
    assert [(w.label, w.start, w.value) for w in f.windows] == [("1h", ts(15), 318.25)]
    assert f.horizon_seconds(now) == 3 * H + 40 * 60


def test_ties_resolve_to_the_earliest_window() -> None:
    t0 = 1_736_899_200.0  # 2025-01-15 00:00 UTC
    src = ScriptedSource("static", "carbon", [(t0, t0 + H, 5.0), (t0 + H, t0 + 2 * H, 3.0),
                                              (t0 + 2 * H, t0 + 3 * H, 3.0), (t0 + 3 * H, t0 + 4 * H, 3.0),
                                              (t0 + 4 * H, t0 + 5 * H, 9.0)])
    chain = SignalChain("carbon", "DE", 7200.0, [src], clock=lambda: t0)
    chain.poll_due()
    f = forecast_signal(chain.state, t0, (H, 2 * H, 5 * H, 6 * H))
    assert f is not None
    got = {w.label: (w.start, w.value) for w in f.windows}
    assert got["1h"] == (t0 + H, 3.0)  # 01:00, 02:00 and 03:00 are equal: the earliest
    assert got["2h"] == (t0 + H, 3.0)
    assert got["5h"] == (t0, pytest.approx(23 / 5))
    assert "6h" not in got  # longer than the data


def test_only_the_serving_sources_data_are_searched() -> None:
    """A fallback's cheaper hours never show while the preferred source serves; they do once it is stale."""
    t0 = 1_736_899_200.0
    now = [t0]
    first = ScriptedSource("electricitymaps", "carbon", [(t0, t0 + 4 * H, 300.0)])
    fallback = ScriptedSource("bundled", "carbon", [(t0, t0 + 24 * H, 100.0)])
    chain = SignalChain("carbon", "DE", 3 * H, [first, fallback], clock=lambda: now[0])
    chain.poll_due()
    f = forecast_signal(chain.state, t0 + 60, (H,))
    assert f is not None and f.source == "electricitymaps" and f.windows[0].value == 300.0
    now[0] = t0 + 2 * H
    first.error = SourceError("timeout", "electricitymaps: timed out")  # keeps its data, which age
    chain.poll_due()
    later = t0 + 3 * H + 120  # the preferred source's data are older than max_age; the fallback's are not
    f = forecast_signal(chain.state, later, (H,))
    assert f is not None and f.source == "bundled" and f.windows[0].value == 100.0


# --- export --------------------------------------------------------------------------------------------------


def test_exported_families_and_labels(server: FixtureServer) -> None:
    now = ts(10, 20)
    grid = GridSignals(carbon=em_chain(server, now), forecast_windows=(H, 3 * H, 8 * H))
    text = render(grid, now)
    start = series_of(text, "wattson_grid_best_window_start_timestamp_seconds")
    assert start == {(("signal", "carbon"), ("window", "1h"), ("zone", "DE")): ts(15),
                     (("signal", "carbon"), ("window", "3h"), ("zone", "DE")): ts(11)}
    avg = series_of(text, "wattson_grid_carbon_intensity_best_window_grams_per_kwh")
    assert avg[(("window", "1h"), ("zone", "DE"))] == 318.25
    assert avg[(("window", "3h"), ("zone", "DE"))] == pytest.approx(357.667, abs=1e-3)
    assert len(avg) == 2  # no 8h series: absent, never 0
    assert series_of(text, "wattson_grid_forecast_horizon_seconds") == {
        (("signal", "carbon"), ("zone", "DE")): 20400.0}


def test_no_forecast_means_no_series(server: FixtureServer) -> None:
    """Without the forecast the data end with the current hour: no window fits and there is no horizon."""
    now = ts(12, 20)
    grid = GridSignals(carbon=em_chain(server, now, forecast=False), forecast_windows=(H, 3 * H))
    text = render(grid, now)
    assert "# TYPE wattson_grid_best_window_start_timestamp_seconds gauge" in text
    for name in ("wattson_grid_best_window_start_timestamp_seconds",
                 "wattson_grid_carbon_intensity_best_window_grams_per_kwh",
                 "wattson_electricity_price_best_window_per_kwh", "wattson_grid_forecast_horizon_seconds"):
        assert series_of(text, name) == {}, name
    assert series_of(text, "wattson_grid_carbon_intensity_grams_per_kwh")  # the signal itself is there


PRICE_CONFIG = """
grid:
  carbon: null
  price:
    zone: DE
    sources:
      - type: tou
        timezone: UTC
        currency: EUR
        adder_per_kwh: 0.10
        multiplier: 1.2
        default_price_per_kwh: 0.40
        bands:
          - {days: all, start: "01:00", end: "05:00", price_per_kwh: 0.20}
  forecast:
    windows: [1h, 3h, 90m]
"""


def price_grid(now: float) -> GridSignals:
    grid = build_grid(parse_config(PRICE_CONFIG))
    assert grid.price is not None
    grid.price.clock = lambda: now
    grid.price.poll_due()
    return grid


def test_price_windows_carry_the_currency_and_the_retail_transform() -> None:
    """Band 0.20 and default 0.40 EUR/kWh, exported as (price + 0.10) x 1.2: 0.36 and 0.60."""
    now = ts(12)
    grid = price_grid(now)
    text = render(grid, now)
    price = series_of(text, "wattson_electricity_price_best_window_per_kwh")
    assert set(price) == {(("currency", "EUR"), ("window", w), ("zone", "DE")) for w in ("1h", "3h", "90m")}
    assert all(v == pytest.approx(0.36) for v in price.values())
    start = series_of(text, "wattson_grid_best_window_start_timestamp_seconds")
    day = datetime(2025, 1, 16, tzinfo=timezone.utc).timestamp()
    assert start[(("signal", "price"), ("window", "3h"), ("zone", "DE"))] == day + 1 * H  # tomorrow 01:00
    assert series_of(text, "wattson_electricity_price_per_kwh") == {
        (("currency", "EUR"), ("zone", "DE")): pytest.approx(0.60)}
    assert series_of(text, "wattson_grid_carbon_intensity_best_window_grams_per_kwh") == {}


def test_best_windows_are_cached_per_chain_state_and_refreshed() -> None:
    now = ts(12)
    grid = price_grid(now)
    first = grid.best_windows(now)
    assert grid.best_windows(now + 1) is not first  # a new tuple, but ...
    assert grid.best_windows(now + 1)[0] is first[0]  # ... the same result object: not searched again
    assert grid.best_windows(now + REFRESH_SECONDS)[0] is not first[0]  # a minute on: searched again
    again = grid.best_windows(now + REFRESH_SECONDS + 1)[0]
    assert grid.price is not None
    grid.price._next_poll[0] = 0.0
    grid.price.poll_due()  # new data: a new state, searched at once
    assert grid.best_windows(now + REFRESH_SECONDS + 2)[0] is not again
    # cached answers cost microseconds: the sampler asks every round
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        grid.best_windows(now + REFRESH_SECONDS + 3)
    assert (time.perf_counter() - started) / rounds < 200e-6


def test_the_sampler_publishes_best_windows_in_each_snapshot() -> None:
    from tests.fakes import Clock, ConstantGpu, ListBackend
    from wattson.sampler import Sampler

    clock = Clock(ts(12))
    grid = price_grid(ts(12))
    sampler = Sampler(ListBackend([ConstantGpu(0, clock, 100)]), grid=grid, clock=clock.time)
    sampler.start_backend()
    snap = sampler.sample_round()
    assert [f.signal for f in snap.forecasts] == ["price"]
    assert [w.label for w in snap.forecasts[0].windows] == ["1h", "3h", "90m"]


# --- the forecast API ----------------------------------------------------------------------------------------

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_forecast_api_body_has_the_carbon_aware_sdk_shape(server: FixtureServer) -> None:
    now = ts(10, 20)
    grid = GridSignals(carbon=em_chain(server, now))
    status, body = forecast_response(grid, now, {"signal": ["carbon"], "window": ["3h"]})
    assert status == 200 and isinstance(body, list) and len(body) == 1
    doc = body[0]
    assert set(doc) == {"location", "dataStartAt", "dataEndAt", "windowSize", "optimalDataPoints", "forecastData",
                        "generatedAt", "requestedAt"}
    assert doc["location"] == "DE" and doc["windowSize"] == 180
    assert doc["dataStartAt"] == "2025-01-15T10:20:00Z" and doc["dataEndAt"] == "2025-01-15T16:00:00Z"
    assert doc["requestedAt"] == "2025-01-15T10:20:00Z" and doc["generatedAt"] == "2025-01-15T10:20:00Z"
    assert doc["optimalDataPoints"] == [
        {"location": "DE", "timestamp": "2025-01-15T11:00:00Z", "duration": 180, "value": 357.666667}]
    assert doc["forecastData"] == [
        {"location": "DE", "timestamp": "2025-01-15T10:20:00Z", "duration": 180, "value": 370.666667},
        {"location": "DE", "timestamp": "2025-01-15T11:00:00Z", "duration": 180, "value": 357.666667}]
    for point in doc["optimalDataPoints"] + doc["forecastData"]:
        assert ISO.fullmatch(point["timestamp"]) and isinstance(point["duration"], int)
        assert isinstance(point["value"], float)
    json.dumps(body)  # JSON-ready as it is


def test_forecast_api_defaults_and_sdk_parameters(server: FixtureServer) -> None:
    now = ts(10, 20)
    grid = GridSignals(carbon=em_chain(server, now))
    # no signal: carbon; no window: one data point (an hour here); `location` is accepted and ignored
    status, body = forecast_response(grid, now, {"location": ["eastus"]})
    assert status == 200 and body[0]["windowSize"] == 60 and body[0]["location"] == "DE"
    assert body[0]["optimalDataPoints"][0]["timestamp"] == "2025-01-15T15:00:00Z"
    # windowSize in minutes, and dataStartAt / dataEndAt bound the windows
    status, body = forecast_response(grid, now, {"windowSize": ["60"], "dataEndAt": ["2025-01-15T14:00:00Z"]})
    assert status == 200 and body[0]["dataEndAt"] == "2025-01-15T14:00:00Z"
    assert body[0]["optimalDataPoints"][0] == {"location": "DE", "timestamp": "2025-01-15T13:00:00Z",
                                               "duration": 60, "value": 340.0}
    status, body = forecast_response(grid, now, {"window": ["2h"], "dataStartAt": ["2025-01-15T12:00:00+00:00"]})
    assert status == 200 and body[0]["optimalDataPoints"][0]["timestamp"] == "2025-01-15T12:00:00Z"
    assert [p["timestamp"] for p in body[0]["forecastData"]] == ["2025-01-15T12:00:00Z"]
    # a start in the past is a start now
    status, body = forecast_response(grid, now, {"window": ["3h"], "dataStartAt": ["2025-01-01T00:00:00"]})
    assert status == 200 and body[0]["dataStartAt"] == "2025-01-15T10:20:00Z"


def test_forecast_api_for_price_adds_the_currency() -> None:
    now = ts(12)
    status, body = forecast_response(price_grid(now), now, {"signal": ["price"], "window": ["90m"]})
    assert status == 200
    doc = body[0]
    assert doc["currency"] == "EUR" and doc["windowSize"] == 90
    assert doc["optimalDataPoints"] == [
        {"location": "DE", "timestamp": "2025-01-16T01:00:00Z", "duration": 90, "value": 0.36}]


@pytest.mark.parametrize(("query", "status", "needle"), [
    ({"signal": ["wind"]}, 400, "signal must be carbon or price, got 'wind'"),
    ({"window": ["3 hours"]}, 400, "window '3 hours': expected"),
    ({"windowSize": ["-5"]}, 400, "windowSize '-5': expected a whole number of minutes"),
    ({"dataStartAt": ["yesterday"]}, 400, "dataStartAt: 'yesterday' is not an ISO 8601 time"),
    ({"dataStartAt": ["2025-01-15T13:00:00Z"], "dataEndAt": ["2025-01-15T12:00:00Z"]}, 400,
     "dataEndAt must be after dataStartAt"),
    ({"signal": ["price"]}, 404, "the price signal is disabled (grid.price: null)"),
    ({"window": ["8h"]}, 404, "no forecast: the electricitymaps data for the carbon signal hold no 8h window between"),
    ({"window": ["4h"]}, 404, "hold no 4h window without a gap between 2025-01-15T10:20:00Z and 2025-01-15T16:00:00Z"),
])
def test_forecast_api_errors(server: FixtureServer, query: dict[str, list[str]], status: int, needle: str) -> None:
    now = ts(10, 20)
    got_status, body = forecast_response(GridSignals(carbon=em_chain(server, now)), now, query)
    assert got_status == status and set(body) == {"error"}
    assert needle in body["error"] and "\n" not in body["error"]


def test_forecast_api_with_no_source_serving() -> None:
    src = ScriptedSource("electricitymaps", "carbon", [(0.0, 1.0, 300.0)])
    chain = SignalChain("carbon", "DE", 7200.0, [src], clock=lambda: 1000.0)
    chain.poll_due()
    status, body = forecast_response(GridSignals(carbon=chain), 1000.0, {})
    assert status == 404 and body["error"].startswith("no forecast: no source serves the carbon signal now")


# --- wattson forecast --------------------------------------------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattson", "forecast", *args], capture_output=True, text=True,
                          timeout=30, env={"PYTHONPATH": str(ROOT / "exporter"), "PATH": "/usr/bin:/bin",
                                           "TZ": "UTC", **env})


def test_cli_prints_a_table_for_a_static_config(tmp_path: Path) -> None:
    cfg = tmp_path / "grid.yml"
    cfg.write_text(PRICE_CONFIG.replace("carbon: null", "carbon: {zone: DE, sources: [{type: static, "
                                                        "grams_per_kwh: 380}]}"))
    proc = run_cli("--config.file", str(cfg))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "carbon intensity, zone DE, gCO2e/kWh: now 380.0 from static" in out
    assert "electricity price, zone DE, EUR/kWh: now " in out
    assert out.count("best windows:") == 2 and out.count("next 24 h (average per hour):") == 2
    price = out[out.index("electricity price"):]
    assert re.search(r"^ {4}3h +\S.* 0\.3600 ", price, re.M), price  # the night band, after adder and VAT
    assert re.search(r"^ {4}1h +now .* 380\.0 +same as now$", out, re.M), out
    hours = [line for line in price.splitlines() if re.match(r" {4}(\w{3} \d\d \w{3} )?\d\d:00", line)]
    assert len(hours) == 24 and "now" in hours[0]
    assert proc.stderr == ""
    # --window replaces the configured lengths
    proc = run_cli("--config.file", str(cfg), "--window", "2h")
    assert proc.returncode == 0 and re.search(r"^ {4}2h ", proc.stdout, re.M) and " 3h " not in proc.stdout


def test_cli_exits_2_on_a_bad_config_and_1_when_no_source_answers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("grid:\n  forecast:\n    windows: [1h, 5x]\n")
    proc = run_cli("--config.file", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"{bad}:3: grid.forecast.windows[1]: window '5x'" in proc.stderr
    proc = run_cli("--window", "3 h")
    assert proc.returncode == 2 and proc.stderr.startswith("wattson forecast: error: --window: window '3 h'")
    down = tmp_path / "down.yml"
    down.write_text("grid:\n  carbon: {sources: [{type: electricitymaps, base_url: 'http://127.0.0.1:9'}]}\n"
                    "  price: null\n")
    proc = run_cli("--config.file", str(down), ELECTRICITYMAPS_API_KEY="k")
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("wattson forecast: error: no source answered (electricitymaps: ")
