"""The grid hub: one wattson (gpu.backend: none) polls the grid APIs and serves `GET /api/v1/grid`; hosts read
it with a `wattson` source and keep a local fallback.

Unit tests: the hub's answer (timeline cut as the chain cuts it, ETag and 304, 404 listing what is served),
the source's parsing, error reasons, auth and provenance, the start-time check, the GPU-less backend.
Integration tests: a hub and six hosts over loopback against the programmable grid APIs of the fault suite.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port, stop_process
from tests.daemon import ROOT, Daemon, get
from tests.faults_support import GridApi, Metrics, Scraper, scrape, wait_for
from tests.fixture_server import FixtureServer, Request, Response, json_response
from wattson.config import parse_config
from wattson.exposition import snapshot_metrics
from wattson.grid import hub
from wattson.grid import wattson as relay
from wattson.grid.base import FetchResult, Interval, MissingSecret, SourceError
from wattson.grid.registry import CARBON_SOURCES, PRICE_SOURCES, build_grid
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import FOREVER
from wattson.snapshot import Snapshot

HOUR = 3600.0
NOW = 1_781_517_600.0 + 1234.5  # 2026-06-15 10:20:34.5 UTC
H0 = NOW // HOUR * HOUR


# --- helpers -----------------------------------------------------------------------------------------


class Fixed:
    """A source that answers the same intervals at every fetch."""

    poll_interval_seconds = 60.0

    def __init__(self, name: str, intervals: list[Interval], currency: str | None = None,
                 signal: str = "carbon") -> None:
        self.name, self.signal, self.zone = name, signal, "DE"
        self.result = FetchResult(tuple(intervals), currency)

    def fetch(self, now: float) -> FetchResult:
        return self.result

    def secrets(self) -> tuple[str, ...]:
        return ()


def hourly(first: int, last: int, base: float = 100.0, forecast_from: int = 1, skip: tuple[int, ...] = (),
           estimated: tuple[int, ...] = ()) -> list[Interval]:
    """Hours H0+first .. H0+last (inclusive), value base+k; forecast from hour `forecast_from` on."""
    return [Interval(H0 + k * HOUR, H0 + (k + 1) * HOUR, base + k, estimated=k in estimated,
                     forecast=k >= forecast_from) for k in range(first, last + 1) if k not in skip]


def chain(signal: str, sources: list[Fixed], now: float = NOW, max_age: float = 7200.0,
          transforms: list[Any] | None = None) -> SignalChain:
    c = SignalChain(signal, "DE", max_age, sources, transforms, clock=lambda: now)  # type: ignore[arg-type]
    c.poll_due()
    return c


def carbon_grid(now: float = NOW, **kw: Any) -> GridSignals:
    em = Fixed("electricitymaps", hourly(-30, 24, skip=(3,), estimated=(0,)))
    return GridSignals(carbon=chain("carbon", [em, Fixed("static", [Interval(0.0, FOREVER, 456.0)])], now, **kw))


def body_of(answer: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    status, headers, body = answer
    assert status == 200, body
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    return dict(json.loads(body))


def value_in(intervals: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    found = [iv for iv in intervals if iv["start"] <= t < iv["end"]]
    assert len(found) <= 1, found
    return found[0] if found else None


# --- the hub's answer --------------------------------------------------------------------------------


def test_timeline_is_what_the_chain_prices_with() -> None:
    """Every moment from 24 h ago to the end of the data has the value the chain would price it with, from
    the source that serves it; the missing hour is filled by the fallback, and after the primary's data end
    the fallback serves up to 7 days ahead."""
    grid = carbon_grid()
    body = body_of(hub.grid_response(grid, NOW, {}, None))
    assert body["version"] == 1 and body["generated_at"] == NOW
    (entry,) = body["signals"]
    assert (entry["signal"], entry["zone"]) == ("carbon", "DE")
    ivs = entry["intervals"]
    assert ivs[0]["start"] == H0 - 24 * HOUR  # 24 h back, on a whole hour
    assert ivs[-1]["end"] == H0 + 7 * 24 * HOUR + HOUR  # 7 days ahead, rounded up to the hour
    for a, b in zip(ivs, ivs[1:], strict=False):
        assert a["end"] == b["start"]  # no gap: the static fallback covers every hole
    state = grid.carbon.state  # type: ignore[union-attr]
    rng = random.Random(7)
    for t in [ivs[0]["start"] + rng.random() * (ivs[-1]["end"] - ivs[0]["start"]) for _ in range(500)]:
        v = state.value_at(t, NOW)
        assert v is not None
        got = value_in(ivs, t)
        assert got is not None and got["value"] == v.value and got["source"] == v.source, (t, got, v)
        assert got["estimated"] == v.interval.estimated and got["forecast"] == v.interval.forecast
        assert got["fetched_at"] == NOW and got["unit"] == "gCO2e/kWh" and got["currency"] is None
    hole = value_in(ivs, H0 + 3.5 * HOUR)
    assert hole == {"start": H0 + 3 * HOUR, "end": H0 + 4 * HOUR, "value": 456.0, "unit": "gCO2e/kWh",
                    "currency": None, "source": "static", "estimated": False, "forecast": False,
                    "fetched_at": NOW}
    assert value_in(ivs, H0 + 0.5 * HOUR)["estimated"] is True  # type: ignore[index]
    tail = value_in(ivs, H0 + 30 * HOUR)
    assert tail is not None and tail["source"] == "static" and tail["start"] == H0 + 25 * HOUR


def test_pieces_end_where_split_cuts() -> None:
    """Pieces end where an interval ends or any source's next interval starts, as `split` cuts an energy
    step: a fallback's long interval is cut where the preferred source's data resume."""
    primary = Fixed("entsoe", [Interval(H0 + 2 * HOUR, H0 + 3 * HOUR, 0.1)], "EUR", "price")
    fallback = Fixed("tou", [Interval(H0 - 30 * HOUR, H0 + 48 * HOUR, 0.3)], "EUR", "price")
    grid = GridSignals(price=chain("price", [primary, fallback]))
    ivs = body_of(hub.grid_response(grid, NOW, {}, None))["signals"][0]["intervals"]
    assert [(iv["start"] - H0, iv["end"] - H0, iv["source"]) for iv in ivs] == [
        (-24 * HOUR, 2 * HOUR, "tou"), (2 * HOUR, 3 * HOUR, "entsoe"), (3 * HOUR, 48 * HOUR, "tou")]
    pieces = grid.price.state.split(H0 - 24 * HOUR, H0 + 48 * HOUR, NOW)  # type: ignore[union-attr]
    assert [v.source for _f, v in pieces if v is not None] == ["tou", "entsoe", "tou"]


def test_stale_primary_is_not_served_and_no_data_means_no_intervals() -> None:
    em = Fixed("electricitymaps", hourly(-5, 5))
    c = chain("carbon", [em, Fixed("static", [Interval(0.0, FOREVER, 456.0)])], NOW - 100, max_age=50)
    c.clock = lambda: NOW
    c._poll(1, c.sources[1], NOW)  # the fallback fresh, the primary 100 s old
    ivs = body_of(hub.grid_response(GridSignals(carbon=c), NOW, {}, None))["signals"][0]["intervals"]
    # Cut at the stale source's hour boundaries like split, then joined: one piece of the fallback.
    assert [(iv["source"], iv["start"]) for iv in ivs] == [("static", H0 - 24 * HOUR)]
    only = chain("carbon", [Fixed("electricitymaps", hourly(-5, 5))], NOW - 100, max_age=50)
    body = body_of(hub.grid_response(GridSignals(carbon=only), NOW, {}, None))
    assert body["signals"] == [{"signal": "carbon", "zone": "DE", "intervals": []}]


def test_prices_carry_currency_unit_adjustments_and_relayed_origin() -> None:
    """Prices are served as exported (the hub's adder and multiplier applied); a value the hub itself got
    from another hub keeps its upstream source."""
    rows = [Interval(H0 + k * HOUR, H0 + (k + 1) * HOUR, 0.1, origin="entsoe") for k in range(-1, 2)]
    adjust = [lambda v: (v + 0.1) * 1.19]
    grid = GridSignals(price=chain("price", [Fixed("wattson", rows, "EUR", "price")], transforms=adjust))
    ivs = body_of(hub.grid_response(grid, NOW, {"signal": ["price"]}, None))["signals"][0]["intervals"]
    assert {(iv["value"], iv["unit"], iv["currency"], iv["source"]) for iv in ivs} == \
        {((0.1 + 0.1) * 1.19, "EUR/kWh", "EUR", "entsoe")}


def test_filters_and_not_served() -> None:
    carbon = carbon_grid().carbon
    grid = GridSignals(carbon=carbon, price=chain("price", [Fixed("static", [Interval(0.0, FOREVER, 0.3)],
                                                                       "EUR", "price")]))
    both = body_of(hub.grid_response(grid, NOW, {}, None))
    assert [(s["signal"], s["zone"]) for s in both["signals"]] == [("carbon", "DE"), ("price", "DE")]
    one = body_of(hub.grid_response(grid, NOW, {"signal": ["price"], "zone": ["de"]}, None))
    assert [(s["signal"], s["zone"]) for s in one["signals"]] == [("price", "DE")]
    served = [{"signal": "carbon", "zone": "DE"}, {"signal": "price", "zone": "DE"}]
    for query, words in (({"zone": ["FR"]}, "zone 'FR'"), ({"signal": ["wind"]}, "unknown signal 'wind'"),
                         ({"signal": ["carbon"], "zone": ["FR"]}, "carbon signal")):
        status, headers, body = hub.grid_response(grid, NOW, query, None)
        assert status == 404 and "ETag" not in headers
        doc = json.loads(body)
        assert words in doc["error"] and "\n" not in doc["error"] and doc["served"] == served
    disabled = GridSignals(carbon=grid.carbon)
    status, _h, body = hub.grid_response(disabled, NOW, {"signal": ["price"]}, None)
    assert status == 404 and json.loads(body)["served"] == [{"signal": "carbon", "zone": "DE"}]


def test_etag_and_304() -> None:
    """The ETag hashes everything but the generation time: the same data within the hour keep it (a host
    polling gets 304 and no body); new data or a new hour change it."""
    grid = carbon_grid()
    status, headers, _body = hub.grid_response(grid, NOW, {}, None)
    etag = headers["ETag"]
    later = hub.grid_response(grid, NOW + 10, {}, None)
    assert later[1]["ETag"] == etag and json.loads(later[2])["generated_at"] == NOW + 10
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        assert hub.grid_response(grid, NOW + 10, {}, header) == (304, headers, b"")
    assert hub.grid_response(grid, NOW, {}, '"other"')[0] == 200
    assert hub.grid_response(grid, NOW + HOUR, {}, None)[1]["ETag"] != etag  # the window moved by an hour
    refetched = carbon_grid(now=NOW + 5)
    assert hub.grid_response(refetched, NOW + 10, {}, None)[1]["ETag"] != etag  # fetched_at changed
    narrowed = hub.grid_response(grid, NOW, {"signal": ["carbon"]}, None)
    assert narrowed[1]["ETag"] == etag  # the same content (one signal served): the same tag


# --- the source --------------------------------------------------------------------------------------


def hub_answer(grid: GridSignals, now: float = NOW) -> Any:
    """A route that answers like a hub with `grid`, honouring the query and If-None-Match."""
    def route(req: Request) -> Response:
        status, headers, body = hub.grid_response(grid, now, req.query, req.headers.get("if-none-match"))
        return status, {"Content-Type": hub.CONTENT_TYPE, **headers}, body
    return route


def source(server: FixtureServer, signal: str = "carbon", zone: str = "DE", **kw: Any) -> relay.WattsonSource:
    table = CARBON_SOURCES if signal == "carbon" else PRICE_SOURCES
    model, factory = table["wattson"]
    cfg = model.model_validate(  # type: ignore[attr-defined]
        {"type": "wattson", "base_url": server.base_url, "timeout_seconds": 1, **kw})
    src = factory(cfg, zone)
    assert isinstance(src, relay.WattsonSource)
    return src


def error(src: relay.WattsonSource, now: float = NOW) -> SourceError:
    with pytest.raises(SourceError) as info:
        src.fetch(now)
    msg = str(info.value)
    assert msg.startswith("wattson: ") and "\n" not in msg, msg
    return info.value


def test_registered_for_both_signals() -> None:
    assert CARBON_SOURCES["wattson"] == (relay.CarbonConfig, relay.build_carbon)
    assert PRICE_SOURCES["wattson"] == (relay.PriceConfig, relay.build_price)
    cfg = parse_config("grid:\n  carbon: {zone: DE, sources: [{type: wattson, base_url: 'https://hub:9874'}]}\n"
                       "  price: {zone: DE, sources: [{type: wattson, base_url: 'https://hub:9874', "
                       "adder_per_kwh: 0.01}, {type: static, price_per_kwh: 0.3, currency: EUR}]}\n")
    grid = build_grid(cfg)
    assert grid.describe() == "carbon=DE:wattson price=DE:wattson>static"
    src = grid.carbon.sources[0]  # type: ignore[union-attr]
    assert src.poll_interval_seconds == 60.0 and src.secrets() == ()


def test_round_trip_keeps_values_and_provenance(server: FixtureServer) -> None:
    """What a host's chain prices with equals what the hub's does, at every moment, and says where it came
    from: source electricitymaps (or the hub's fallback), via wattson."""
    grid = carbon_grid()
    server.routes[hub.PATH] = hub_answer(grid)
    src = source(server)
    result = src.fetch(NOW)
    (req,) = server.requests
    assert req.query == {"signal": ["carbon"], "zone": ["DE"]} and req.headers["accept"] == "application/json"
    assert "if-none-match" not in req.headers and "authorization" not in req.headers
    host = chain("carbon", [src])  # type: ignore[list-item]
    hub_state, host_state = grid.carbon.state, host.state  # type: ignore[union-attr]
    rng = random.Random(3)
    for t in [NOW - 23 * HOUR + rng.random() * 190 * HOUR for _ in range(500)]:
        a, b = hub_state.value_at(t, NOW), host_state.value_at(t, NOW)
        assert a is not None and b is not None
        assert (b.value, b.origin, b.interval.estimated, b.interval.forecast) == \
            (a.value, a.source, a.interval.estimated, a.interval.forecast)
        assert b.source == "wattson"
    assert {iv.origin for iv in result.intervals} == {"electricitymaps", "static"}
    signals, sources = GridSignals(carbon=host).now(NOW)
    (now_signal,) = signals
    assert (now_signal.source, now_signal.via, now_signal.value) == ("electricitymaps", "wattson", 100.0)
    assert [s.source for s in sources] == ["wattson"]
    snap = Snapshot(seq=1, timestamp=NOW, duration_seconds=0.0, backend="simulated", ready=True, gpus=(),
                    signals=signals, sources=sources)
    info = next(m for m in snapshot_metrics(snap) if m.name == "wattson_grid_signal_info")
    assert [s.labels for s in info.samples] == [
        {"signal": "carbon", "zone": "DE", "source": "electricitymaps", "estimated": "true", "via": "wattson"}]
    direct = GridSignals(carbon=grid.carbon).now(NOW)[0][0]
    assert (direct.source, direct.via) == ("electricitymaps", "")


def test_price_round_trip_and_host_adjustments(server: FixtureServer) -> None:
    rows = [Interval(H0 + k * HOUR, H0 + (k + 1) * HOUR, 0.2 + k / 100) for k in range(-2, 3)]
    grid = GridSignals(price=chain("price", [Fixed("awattar", rows, "EUR", "price")],
                                   transforms=[lambda v: (v + 0.1) * 1.19]))
    server.routes[hub.PATH] = hub_answer(grid)
    src = source(server, "price", adder_per_kwh=0.05, multiplier=2)
    result = src.fetch(NOW)
    assert result.currency == "EUR" and server.requests[0].query["signal"] == ["price"]
    assert [iv.value for iv in result.intervals] == [(0.2 + k / 100 + 0.1) * 1.19 for k in range(-2, 3)]
    host = build_grid(parse_config(f"grid:\n  price: {{zone: DE, sources: [{{type: wattson, base_url: "
                                   f"'{server.base_url}', adder_per_kwh: 0.05, multiplier: 2}}]}}\n"))
    host.price.clock = lambda: NOW  # type: ignore[union-attr]
    host.price.poll_due()  # type: ignore[union-attr]
    v = host.price.state.value_at(NOW, NOW)  # type: ignore[union-attr]
    assert v is not None and v.value == ((0.2 + 0.1) * 1.19 + 0.05) * 2 and v.currency == "EUR"


def test_etag_sent_and_304_keeps_the_intervals(server: FixtureServer) -> None:
    grid = carbon_grid()
    server.routes[hub.PATH] = hub_answer(grid)
    src = source(server)
    first = src.fetch(NOW)
    second = src.fetch(NOW + 30)
    etag = hub.grid_response(grid, NOW, {"signal": ["carbon"], "zone": ["DE"]}, None)[1]["ETag"]
    assert server.requests[1].headers["if-none-match"] == etag
    assert second is first  # a 304: the same intervals, fetched afresh
    c = chain("carbon", [src], NOW + 60)  # type: ignore[list-item]
    assert c.state.caches[0] is not None and c.state.caches[0].fetched_at == NOW + 60
    # A 304 to a request without If-None-Match is a broken hub.
    server.routes[hub.PATH] = (304, {}, b"")
    assert error(source(server)).reason == "malformed"


def _body(**over: Any) -> dict[str, Any]:
    iv = {"start": H0, "end": H0 + HOUR, "value": 123.0, "unit": "gCO2e/kWh", "currency": None,
          "source": "electricitymaps", "estimated": False, "forecast": False, "fetched_at": NOW - 5}
    iv.update(over.pop("interval", {}))
    entry = {"signal": "carbon", "zone": "DE", "intervals": [iv]}
    entry.update(over.pop("entry", {}))
    return {"version": 1, "generated_at": NOW, "signals": [entry], **over}


@pytest.mark.parametrize("body, reason, words", [
    pytest.param(_body(entry={"zone": "FR"}), "wrong_zone", "signals[0].zone: field 'zone' is 'FR'", id="zone"),
    pytest.param(_body(entry={"signal": "price"}), "wrong_zone", "field 'signal' is 'price'", id="signal"),
    pytest.param(_body(version=2), "malformed", "field 'version' is 2", id="version"),
    pytest.param(_body(entry={"intervals": []}), "no_data", "no carbon data", id="empty"),
    pytest.param(_body(signals=[]), "no_data", "no entry", id="no-entry"),
    pytest.param({"version": 1, "generated_at": NOW}, "missing_field", "field 'signals' is missing", id="missing"),
    pytest.param(_body(interval={"value": 25_000.0}), "invalid_value", "outside 0..5000", id="absurd"),
    pytest.param(_body(interval={"unit": "EUR/kWh"}), "invalid_value", "not gCO2e/kWh", id="unit"),
    pytest.param(_body(interval={"value": "123"}), "malformed", "field 'value' is not a number", id="string"),
    pytest.param(_body(interval={"end": H0}), "malformed", "is not after start", id="backwards"),
    pytest.param(_body(interval={"source": "x" * 80}), "malformed", "field 'source'", id="source-name"),
    pytest.param(_body(interval={"start": -5.0}), "malformed", "not a UNIX time", id="time"),
])
def test_bad_answers_are_rejected_by_reason(server: FixtureServer, body: Any, reason: str, words: str) -> None:
    server.routes[hub.PATH] = json_response(json.dumps(body))
    exc = error(source(server))
    assert exc.reason == reason and words in str(exc), str(exc)


def test_overlap_two_entries_price_without_currency_and_mixed_currencies(server: FixtureServer) -> None:
    two = _body()
    two["signals"][0]["intervals"].append({**two["signals"][0]["intervals"][0], "start": H0 + 1800.0,
                                           "end": H0 + 5400.0})
    server.routes[hub.PATH] = json_response(json.dumps(two))
    assert error(source(server)).reason == "malformed"
    server.routes[hub.PATH] = json_response(json.dumps({**_body(), "signals": _body()["signals"] * 2}))
    assert "expected one" in str(error(source(server)))
    price = {"unit": "EUR/kWh", "currency": None, "value": 0.3}
    server.routes[hub.PATH] = json_response(json.dumps(_body(interval=price, entry={"signal": "price"})))
    assert error(source(server, "price")).reason == "missing_field"
    rows = [{"start": H0 + k * HOUR, "end": H0 + (k + 1) * HOUR, "value": 0.3, "unit": f"{cur}/kWh",
             "currency": cur, "source": "static", "estimated": False, "forecast": False, "fetched_at": NOW}
            for k, cur in ((-1, "GBP"), (0, "EUR"), (1, "GBP"))]
    server.routes[hub.PATH] = json_response(json.dumps(_body(entry={"signal": "price", "intervals": rows})))
    result = source(server, "price").fetch(NOW)
    assert result.currency == "EUR" and [iv.start for iv in result.intervals] == [H0] and "currency" in result.notes


@pytest.mark.parametrize("answer, reason", [
    pytest.param((500, {}, b"oops"), "http_5xx", id="500"),
    pytest.param((401, {}, b"Unauthorized\n"), "auth", id="401"),
    pytest.param((403, {}, b"no"), "auth", id="403"),
    pytest.param((429, {"Retry-After": "7"}, b""), "rate_limited", id="429"),
    pytest.param((404, {}, b"not found\n"), "http_4xx", id="404-not-a-hub"),
    pytest.param((200, {}, b"<html>"), "malformed", id="not-json"),
])
def test_http_failures_map_to_reasons(server: FixtureServer, answer: Response, reason: str) -> None:
    server.routes[hub.PATH] = answer
    assert error(source(server)).reason == reason


def test_not_served_is_wrong_zone_and_names_what_is_served(server: FixtureServer) -> None:
    server.routes[hub.PATH] = hub_answer(carbon_grid())
    exc = error(source(server, zone="FR"))
    assert exc.reason == "wrong_zone"
    assert "does not serve carbon for zone FR (it serves carbon/DE)" in str(exc)
    with pytest.raises(SourceError) as info:
        source(server, zone="FR").preflight()
    assert info.value.reason == "wrong_zone"


def test_timeout_and_connection() -> None:
    from bench.gridfixture import hang

    with FixtureServer(routes={hub.PATH: lambda req: hang(3, (200, {}, b"{}"))}) as slow:
        t0 = time.monotonic()
        assert error(source(slow, timeout_seconds=0.3)).reason == "timeout"
        assert time.monotonic() - t0 < 2
    closed = FixtureServer()
    closed.refuse()
    assert error(source(closed)).reason == "connection"


def test_basic_auth_password_from_env_or_file_never_logged(server: FixtureServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hub-password-do-not-log"
    server.routes[hub.PATH] = lambda req: (500, {}, f"bad auth {req.headers.get('authorization')} {secret}")
    monkeypatch.delenv("WATTSON_HUB_PASSWORD", raising=False)
    src = source(server, username="host")
    with pytest.raises(MissingSecret) as missing:
        src.fetch(NOW)
    assert missing.value.reason == "auth" and "WATTSON_HUB_PASSWORD" in str(missing.value)
    monkeypatch.setenv("WATTSON_HUB_PASSWORD", secret)
    exc = error(src)
    assert exc.reason == "http_5xx" and secret not in str(exc) and "<redacted>" in str(exc)
    assert server.requests[-1].headers["authorization"].startswith("Basic ")
    assert src.secrets() == (secret,)
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    server.routes[hub.PATH] = hub_answer(carbon_grid())
    from_file = source(server, username="host", password_env=None, password_file=str(pw))
    from_file.fetch(NOW)
    import base64

    assert server.requests[-1].headers["authorization"] == "Basic " + base64.b64encode(b"host:from-file").decode()


def test_config_checks(tmp_path: Path) -> None:
    from wattson.config import ConfigError

    def in_grid(src: str) -> str:
        return f"grid:\n  carbon:\n    sources:\n      - {src}\n"

    for src, words in (("{type: wattson}", "base_url: required key is missing"),
                       ("{type: wattson, base_url: 'hub:9874'}", "http:// or https://"),
                       ("{type: wattson, base_url: 'http://hub?x=1'}", "no query"),
                       ("{type: wattson, base_url: 'http://hub', password_file: /pw}", "username is not"),
                       ("{type: wattson, base_url: 'http://hub', api_key_env: X}", "unknown key")):
        with pytest.raises(ConfigError, match="grid.carbon.sources") as info:
            parse_config(in_grid(src))
        assert words in str(info.value), str(info.value)
    cfg = parse_config(in_grid(f"{{type: wattson, base_url: 'https://hub', ca_file: '{tmp_path}/none.pem'}}"))
    with pytest.raises(ConfigError, match=r"grid.carbon.sources\[0\] \(wattson\): ca_file .*no such file"):
        build_grid(cfg)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    built = build_grid(parse_config(in_grid(f"{{type: wattson, base_url: 'https://hub', ca_file: '{ca}'}}")))
    assert built.carbon.sources[0].http.session.verify == str(ca)  # type: ignore[union-attr, attr-defined]


# --- the GPU-less backend and the start-time check ----------------------------------------------------


def test_backend_none() -> None:
    from wattson.cli import build_backend
    from wattson.gpu.none import NoGpuBackend

    cfg = parse_config("gpu: {backend: none}\nworkloads: {enabled: true}\n")
    backend = build_backend(cfg)
    assert isinstance(backend, NoGpuBackend)
    assert (backend.name, backend.simulated, backend.counter_epoch) == ("none", False, "")
    assert backend.start() == [] and backend.restart() == []


def test_example_configs_of_the_hub_profile() -> None:
    """The compose profile's hub has no GPUs and polls the APIs; its host reads the hub service by name, with
    an offline fallback for each signal."""
    import yaml

    hub_cfg = parse_config((ROOT / "docs" / "wattson.hub.yml").read_text(), "hub")
    host_cfg = parse_config((ROOT / "docs" / "wattson.host.yml").read_text(), "host")
    assert hub_cfg.gpu.backend == "none"
    assert all(sig.sources[0].type != "wattson" for sig in (hub_cfg.grid.carbon, hub_cfg.grid.price))  # type: ignore[union-attr]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services["wattson-hub"]["profiles"]) == set(services["wattson-host"]["profiles"]) == {"hub"}
    assert services["wattson-host"]["environment"] == {}  # no API keys on a host
    for sig in (host_cfg.grid.carbon, host_cfg.grid.price):
        assert sig is not None and len(sig.sources) == 2
        first: Any = sig.sources[0]
        assert first.type == "wattson" and first.base_url == "http://wattson-hub:9874"
        assert sig.zone == getattr(hub_cfg.grid, "carbon" if sig is host_cfg.grid.carbon else "price").zone


def run_cli(tmp_path: Path, config: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "host.yml"
    cfg.write_text(config)
    return subprocess.run([sys.executable, "-m", "wattson", "--config.file", str(cfg), "--simulate",
                           "--web.listen-address", "127.0.0.1:0", "--storage.path", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT / "exporter"), "PATH": "/usr/bin:/bin"})


def test_start_exits_2_when_the_hub_does_not_serve_the_zone(server: FixtureServer, tmp_path: Path) -> None:
    server.routes[hub.PATH] = hub_answer(carbon_grid())
    proc = run_cli(tmp_path, f"grid:\n  carbon:\n    zone: FR\n    sources:\n"
                             f"      - {{type: wattson, base_url: '{server.base_url}'}}\n"
                             f"      - {{type: bundled}}\n")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wattson: error: grid.carbon.sources[0] (wattson): ")
    assert "does not serve carbon for zone FR (it serves carbon/DE)" in lines[0]


# --- integration: a hub and its hosts over loopback ----------------------------------------------------


@pytest.mark.integration
def test_a_hub_without_gpus_and_a_host_starting_without_its_hub(tmp_path: Path) -> None:
    """backend none: ready, grid metrics, no GPU series. A host whose hub does not answer at start warns and
    starts on its fallback."""
    closed = f"http://127.0.0.1:{free_port()}"
    grid = "\n  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 300}]}\n"
    with daemon(tmp_path, "none", f"gpu: {{backend: none}}\nworkloads: {{enabled: true}}\ngrid:{grid}") as bare, \
            daemon(tmp_path, "orphan", host_config(hub_chains(closed, 30.0))) as orphan:
        ready(bare, orphan)
        m = scrape(bare.base)
        assert m.value("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE") == 300
        assert not m.find("wattson_gpu_info") and not m.find("wattson_gpu_energy_joules_total")
        assert get(bare.base + "/healthz")[0] == 200
        o = scrape(orphan.base)
        assert info(o, "carbon") == ("bundled", "") and info(o, "price") == ("static", "")
        assert orphan.log().count("grid source not answering as it should at start") == 2
        assert "reason=connection" in orphan.log()

KEY_ENV = {"WATTSON_TEST_EM_KEY": "test-key-not-secret"}
HOSTS = 6
STATIC_PRICE = 0.30
ADJUST = "adder_per_kwh: 0.1, multiplier: 1.19"


def upstream_chains(api: GridApi, max_age: float) -> str:
    """Electricity Maps and aWATTar on the fixture APIs, each with an offline fallback: the hub's chains,
    and those of the host that polls the APIs directly for comparison."""
    return f"""
  carbon:
    zone: DE
    max_age_seconds: {max_age}
    sources:
      - {{type: electricitymaps, base_url: "{api.base_url}", api_key_env: WATTSON_TEST_EM_KEY, use_forecast: false,
          timeout_seconds: 0.5, poll_interval_seconds: 1}}
      - {{type: bundled}}
  price:
    zone: DE
    max_age_seconds: {max_age}
    sources:
      - {{type: awattar, base_url: "{api.base_url}", timeout_seconds: 0.5, poll_interval_seconds: 1, {ADJUST}}}
      - {{type: static, price_per_kwh: 0.2, currency: EUR}}
"""


def hub_chains(hub_url: str, max_age: float, zone: str = "DE") -> str:
    return f"""
  carbon:
    zone: {zone}
    max_age_seconds: {max_age}
    sources:
      - {{type: wattson, base_url: "{hub_url}", timeout_seconds: 0.5, poll_interval_seconds: 1}}
      - {{type: bundled}}
  price:
    zone: DE
    max_age_seconds: {max_age}
    sources:
      - {{type: wattson, base_url: "{hub_url}", timeout_seconds: 0.5, poll_interval_seconds: 1}}
      - {{type: static, price_per_kwh: {STATIC_PRICE}, currency: EUR}}
"""


def hub_config(api: GridApi, max_age: float = 30.0) -> str:
    return f"gpu: {{backend: none}}\nsampler: {{interval_seconds: 1}}\ngrid:{upstream_chains(api, max_age)}"


def host_config(grid: str, seed: int = 3) -> str:
    return (f"gpu:\n  backend: simulated\n  simulated: {{count: 1, profiles: [training], seed: {seed}}}\n"
            f"sampler: {{interval_seconds: 0.5}}\ngrid:{grid}")


@contextmanager
def daemon(tmp_path: Path, name: str, config: str, port: int | None = None,
           env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """wattson in a subprocess on `port` (a free one by default), started without waiting: call ready()."""
    port = port or free_port()
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(config)
    log_path = tmp_path / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "wattson", "--config.file", str(cfg), "--web.listen-address", f"127.0.0.1:{port}",
           "--storage.path", str(tmp_path / f"data-{name}")]
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT / "exporter"),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    try:
        yield Daemon(proc, port, log_path)
    finally:
        stop_process(proc, grace_seconds=5)


def ready(*daemons: Daemon, timeout: float = 40.0) -> None:
    for d in daemons:
        def up(d: Daemon = d) -> bool:
            if d.proc.poll() is not None:
                raise AssertionError(f"wattson exited {d.proc.returncode}: {d.log()}")
            return get(d.base + "/readyz", timeout=1)[0] == 200
        wait_for(f"{d.base} ready", up, timeout=timeout)




def info(m: Metrics, signal: str) -> tuple[str, str] | None:
    found = m.find("wattson_grid_signal_info", signal=signal)
    return (found[0][0]["source"], found[0][0]["via"]) if found else None


def via_hub(m: Metrics) -> bool:
    return info(m, "carbon") == ("electricitymaps", "wattson") and info(m, "price") == ("awattar", "wattson")


def direct(m: Metrics) -> bool:
    return info(m, "carbon") == ("electricitymaps", "") and info(m, "price") == ("awattar", "")


def totals(m: Metrics) -> tuple[float, float, float]:
    """(energy J, cost EUR, CO2e g) summed over the GPUs."""
    def total(name: str) -> float:
        return sum(v for _labels, v in m.find(name))
    return (total("wattson_gpu_energy_joules_total"), total("wattson_gpu_cost_total"),
            total("wattson_gpu_co2e_grams_total"))


def unpriced(m: Metrics) -> float:
    return sum(v for _labels, v in m.find("wattson_gpu_unpriced_energy_joules_total"))


def upstream_requests(api: GridApi, since: float, until: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for h in list(api.hits):
        if since <= h.received < until:
            counts[h.api] = counts.get(h.api, 0) + 1
    return counts


@pytest.mark.integration
def test_hub_and_six_hosts(tmp_path: Path) -> None:
    """One hub and six hosts: the upstream APIs see what one host polling them directly sees; the hosts
    price exactly as that host does, name the upstream source; when the hub goes away they count the
    errors and fall back, never pricing at 0, and come back when it returns on the same port."""
    window = 6.0
    with GridApi() as api_hub, GridApi() as api_direct, ExitStack() as stack:
        hub_port = free_port()
        hub_url = f"http://127.0.0.1:{hub_port}"
        the_hub = stack.enter_context(daemon(tmp_path, "hub", hub_config(api_hub), hub_port, env=KEY_ENV))
        alone = stack.enter_context(daemon(tmp_path, "direct", host_config(upstream_chains(api_direct, 30.0)),
                                           env=KEY_ENV))
        hosts = [stack.enter_context(daemon(tmp_path, f"host{i}", host_config(hub_chains(hub_url, 3.0))))
                 for i in range(HOSTS)]
        ready(the_hub, alone, *hosts)
        wait_for("every host priced via the hub", lambda: all(via_hub(scrape(h.base)) for h in hosts), timeout=20)
        wait_for("the direct host on the APIs", lambda: direct(scrape(alone.base)), timeout=20)

        # The same stretch of time on both sides: upstream requests and what each host accounts.
        before = {h.base: scrape(h.base) for h in [alone, *hosts]}
        t0 = time.time()
        time.sleep(window)
        t1 = time.time()
        after = {h.base: scrape(h.base) for h in [alone, *hosts]}
        via_fleet, alone_counts = upstream_requests(api_hub, t0, t1), upstream_requests(api_direct, t0, t1)
        print(f"upstream requests in {t1 - t0:.1f}s: hub + {HOSTS} hosts {via_fleet}, one host alone {alone_counts}")
        assert set(via_fleet) == set(alone_counts) == {"electricitymaps", "awattar"}
        for api_name, n in alone_counts.items():
            per_fetch = 2 if api_name == "electricitymaps" else 1  # latest + history; marketdata
            assert abs(via_fleet[api_name] - n) <= 2 * per_fetch, (api_name, via_fleet, alone_counts)
        hub_metrics = scrape(the_hub.base)
        assert not hub_metrics.find("wattson_gpu_info") and not hub_metrics.find("wattson_gpu_energy_joules_total")
        intensity = hub_metrics.value("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE")
        assert intensity == api_hub.carbon_grams_per_kwh

        ref_before, ref_after = before[alone.base], after[alone.base]
        assert direct(ref_before) and direct(ref_after)
        e0, c0, g0 = totals(ref_before)
        e1, c1, g1 = totals(ref_after)
        cost_per_joule, grams_per_joule = (c1 - c0) / (e1 - e0), (g1 - g0) / (e1 - e0)
        assert cost_per_joule == pytest.approx((0.2 + 0.1) * 1.19 / 3.6e6, rel=1e-9)
        price = ref_after.must("wattson_electricity_price_per_kwh", zone="DE", currency="EUR")
        intensity = ref_after.must("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE")
        for h in hosts:
            m0, m1 = before[h.base], after[h.base]
            assert via_hub(m0) and via_hub(m1), (info(m0, "carbon"), info(m1, "price"))
            assert m1.must("wattson_electricity_price_per_kwh", zone="DE", currency="EUR") == price
            assert m1.must("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE") == intensity
            e0, c0, g0 = totals(m0)
            e1, c1, g1 = totals(m1)
            assert e1 > e0
            assert (c1 - c0) / (e1 - e0) == pytest.approx(cost_per_joule, rel=1e-9)
            assert (g1 - g0) / (e1 - e0) == pytest.approx(grams_per_joule, rel=1e-9)
            assert m1.value("wattson_source_up", signal="carbon", source="wattson") == 1

        # The hub goes away: every host counts connection errors (a request caught by the shutdown may time
        # out) and falls back; nothing goes unpriced.
        watched = stack.enter_context(Scraper(hosts[0].base, period_seconds=0.2))
        healthy = {h.base: scrape(h.base) for h in hosts}
        stop_process(the_hub.proc, grace_seconds=5)

        def fallen_back(h: Daemon) -> Metrics | None:
            m = scrape(h.base)
            errors = {d["reason"]: v for d, v in m.find("wattson_source_errors_total", source="wattson")
                      if v > 0}
            ok = info(m, "carbon") == ("bundled", "") and info(m, "price") == ("static", "") \
                and errors.get("connection", 0) >= 2 and set(errors) <= {"connection", "timeout"}
            return m if ok else None

        for h in hosts:
            m = wait_for(f"{h.base} on its fallback", partial(fallen_back, h), timeout=15)
            assert m.must("wattson_electricity_price_per_kwh", zone="DE", currency="EUR") == STATIC_PRICE
            assert m.value("wattson_source_up", signal="price", source="wattson") == 0
            assert unpriced(m) == pytest.approx(unpriced(healthy[h.base]), abs=1e-9)

        # It comes back on the same port: the hosts switch back to it.
        the_hub = stack.enter_context(daemon(tmp_path, "hub", hub_config(api_hub), hub_port, env=KEY_ENV))
        ready(the_hub)
        wait_for("every host back on the hub", lambda: all(via_hub(scrape(h.base)) for h in hosts), timeout=20)
        watched.stop()
        prices = {m.value("wattson_electricity_price_per_kwh", zone="DE", currency="EUR") for m in watched.history}
        assert prices <= {price, STATIC_PRICE, None} and 0 not in prices, prices
        assert not watched.decreases and not watched.failures
        for h in hosts:
            assert unpriced(scrape(h.base)) == pytest.approx(unpriced(healthy[h.base]), abs=1e-9)


@pytest.mark.integration
def test_host_asking_for_a_zone_the_hub_does_not_serve_exits_2(tmp_path: Path) -> None:
    with GridApi() as api, daemon(tmp_path, "hub", hub_config(api), env=KEY_ENV) as the_hub:
        ready(the_hub)
        proc = run_cli(tmp_path, f"grid:{hub_chains(the_hub.base, 30.0, zone='FR')}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wattson: error: grid.carbon.sources[0] (wattson): ")
    assert "does not serve carbon for zone FR (it serves carbon/DE, price/DE)" in lines[0]
