"""aWATTar market data: millisecond timestamps, Eur/MWh to EUR/kWh exactly, host per country, errors."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fixture_server import FixtureServer, Request, Response, fixture, json_response
from wattson.grid import awattar
from wattson.grid.base import SourceError
from wattson.grid.registry import PRICE_SOURCES

PATH = "/v1/marketdata"
NOW = datetime(2026, 6, 15, 10, tzinfo=timezone.utc).timestamp()  # 12:00 CEST
DE = fixture("awattar", "marketdata_de.json")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()





def make(server: FixtureServer, zone: str = "DE", **kw: Any) -> awattar.AwattarSource:
    cfg = awattar.Config.model_validate({"type": "awattar", "base_url": server.base_url, "timeout_seconds": 2,
                                         **kw})
    return awattar.build(cfg, zone)


def fetch_error(src: awattar.AwattarSource) -> SourceError:
    with pytest.raises(SourceError) as info:
        src.fetch(NOW)
    msg = str(info.value)
    assert msg.startswith("awattar: ") and "\n" not in msg
    return info.value


def test_registered_and_hosts() -> None:
    assert PRICE_SOURCES["awattar"] == (awattar.Config, awattar.build)
    de = awattar.build(awattar.Config(type="awattar"), "DE-LU")
    at = awattar.build(awattar.Config(type="awattar"), "AT")
    assert (de.country, de.client.base_url) == ("DE", "https://api.awattar.de")
    assert (at.country, at.client.base_url) == ("AT", "https://api.awattar.at")
    explicit = awattar.build(awattar.Config(type="awattar", country="AT"), "anything")
    assert explicit.client.base_url == "https://api.awattar.at"
    assert awattar.build(awattar.Config(type="awattar", zone="de_lu"), "X").country == "DE"
    assert de.secrets() == ()


def test_unknown_zone_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="DE .*AT"):
        awattar.build(awattar.Config(type="awattar"), "FR")
    with pytest.raises(ValidationError):
        awattar.Config.model_validate({"type": "awattar", "country": "CH"})


def test_prices_and_query(server: FixtureServer) -> None:
    server.routes[PATH] = json_response(DE)
    result = make(server).fetch(NOW)
    (req,) = server.requests
    # yesterday 00:00 CEST .. end of tomorrow, in milliseconds
    assert req.query == {"start": ["1781388000000"], "end": ["1781647200000"]}
    assert req.path == PATH
    assert result.currency == "EUR"
    assert [(i.start, i.end, i.value) for i in result.intervals] == [
        (utc(2026, 6, 15, 8), utc(2026, 6, 15, 9), 0.12345),
        (utc(2026, 6, 15, 9), utc(2026, 6, 15, 10), -0.00501),
        (utc(2026, 6, 15, 10), utc(2026, 6, 15, 11), 0.04209),
        (utc(2026, 6, 15, 11), utc(2026, 6, 15, 12), 0.0),
        (utc(2026, 6, 15, 12), utc(2026, 6, 15, 13), 0.2501),
    ]
    assert result.next_poll_seconds is None  # tomorrow not there yet: keep the hourly pace


def test_austria(server: FixtureServer) -> None:
    server.routes[PATH] = json_response(fixture("awattar", "marketdata_at.json"))
    result = make(server, zone="AT").fetch(NOW)
    assert [i.value for i in result.intervals] == [0.0888, 0.09123]


def test_next_poll_after_tomorrow_is_known(server: FixtureServer) -> None:
    start = int(utc(2026, 6, 13, 22) * 1000)
    rows = [{"start_timestamp": start + h * 3600000, "end_timestamp": start + (h + 1) * 3600000,
             "marketprice": 50 + h, "unit": "Eur/MWh"} for h in range(72)]
    server.routes[PATH] = json_response(json.dumps({"object": "list", "data": rows, "url": "/de/v1/marketdata"}))
    result = make(server).fetch(NOW)
    assert len(result.intervals) == 72
    assert result.next_poll_seconds == utc(2026, 6, 16, 12) - NOW  # tomorrow 14:00 CEST


def test_null_price_is_skipped(server: FixtureServer) -> None:
    body = json.loads(DE)
    body["data"][1]["marketprice"] = None
    server.routes[PATH] = json_response(json.dumps(body))
    values = [i.value for i in make(server).fetch(NOW).intervals]
    assert values == [0.12345, 0.04209, 0.0, 0.2501]


def _doc(mutate: Any) -> bytes:
    body = json.loads(DE)
    mutate(body)
    return json.dumps(body).encode()


def _slow(req: Request) -> Response:
    time.sleep(0.6)  # past the client's 0.2 s timeout
    return 200, {}, b""  # nothing left to write to the closed socket


@pytest.mark.parametrize(("route", "reason", "needle"), [
    (json_response(b'{"object": "list", "data": [{"start_timestamp": 17'), "malformed", "not valid JSON"),
    (json_response(_doc(lambda b: b.pop("data"))), "missing_field", "'data'"),
    (json_response(b"[1, 2]"), "malformed", "expected an object"),
    (json_response(_doc(lambda b: b.update(data="none"))), "malformed", "'data'"),
    (json_response(_doc(lambda b: b["data"][2].pop("marketprice"))), "missing_field", "'marketprice'"),
    (json_response(_doc(lambda b: b["data"][2].pop("end_timestamp"))), "missing_field", "'end_timestamp'"),
    (json_response(_doc(lambda b: b["data"][0].update(unit="ct/kWh"))), "invalid_value", "'unit'"),
    (json_response(_doc(lambda b: b["data"][0].update(marketprice=123456.7))), "invalid_value", "123456.7"),
    (json_response(_doc(lambda b: b["data"][0].update(marketprice="42"))), "malformed", "'marketprice'"),
    (json_response(_doc(lambda b: b["data"][0].update(start_timestamp="2026-06-15T08:00Z"))), "malformed",
     "'start_timestamp'"),
    (json_response(_doc(lambda b: b["data"][0].update(start_timestamp=1781510400.5))), "malformed",
     "millisecond"),
    (json_response(_doc(lambda b: b["data"][0].update(end_timestamp=1781510400000))), "malformed",
     "not after"),
    (json_response(_doc(lambda b: b["data"][1].update(start_timestamp=1781512200000))), "malformed", "overlap"),
    (json_response(_doc(lambda b: b.update(url="/at/v1/marketdata"))), "wrong_zone", "/at/v1/marketdata"),
    (json_response(fixture("awattar", "empty.json")), "no_data", "no prices"),
    (json_response(b'{"error": "internal"}', status=500), "http_5xx", "HTTP 500"),
    (json_response(b'{"error": "bad start"}', status=400), "http_4xx", "HTTP 400"),
    (json_response(b"slow down", status=429, **{"Retry-After": "600"}), "rate_limited", "HTTP 429"),
    (_slow, "timeout", "timed out"),
])
def test_errors(server: FixtureServer, route: Any, reason: str, needle: str) -> None:
    server.routes[PATH] = route
    exc = fetch_error(make(server, timeout_seconds=0.2))
    assert exc.reason == reason, str(exc)
    assert needle in str(exc)
    assert f"GET {PATH}" in str(exc)
    if reason == "rate_limited":
        assert exc.retry_after == 600.0


class _ClosedPort:
    """A base_url on a port nothing listens on (bound, then closed), without a server's shutdown delay."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_connection_refused() -> None:
    gone = _ClosedPort()
    src = make(gone)
    assert fetch_error(src).reason == "connection"
