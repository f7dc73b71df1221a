"""Octopus Energy unit rates: pagination, exact pence-to-pound conversion, errors, open-ended rates."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fixture_server import FixtureServer, Request, Response, fixture, json_response
from wattson.grid import octopus
from wattson.grid.base import Interval, SourceError
from wattson.grid.registry import PRICE_SOURCES

PRODUCT = "AGILE-24-10-01"
TARIFF = "E-1R-AGILE-24-10-01-C"
PATH = f"/v1/products/{PRODUCT}/electricity-tariffs/{TARIFF}/standard-unit-rates/"
NOW = datetime(2026, 1, 15, 12, 10, tzinfo=timezone.utc).timestamp()
CANARY = "sk_live_canary_octopus_5d2e81"
ENV = "WATTSON_TEST_OCTOPUS_KEY"
PAGE1 = fixture("octopus", "agile_page1.json")
PAGE2 = fixture("octopus", "agile_page2.json")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()





def make(server: FixtureServer, base_path: str = "", **kw: Any) -> octopus.OctopusSource:
    cfg = octopus.Config.model_validate({"type": "octopus", "base_url": server.base_url + base_path,
                                         "product_code": PRODUCT, "tariff_code": TARIFF,
                                         "timeout_seconds": 2, **kw})
    return octopus.build(cfg, "GB")


def two_pages(req: Request) -> Response:
    return json_response(PAGE2 if req.query.get("page") == ["2"] else PAGE1)


def fetch_error(src: octopus.OctopusSource) -> SourceError:
    with pytest.raises(SourceError) as info:
        src.fetch(NOW)
    msg = str(info.value)
    assert msg.startswith("octopus: ") and "\n" not in msg and CANARY not in msg
    return info.value


def spans(ivs: tuple[Interval, ...]) -> list[tuple[float, float, float]]:
    return [(i.start, i.end, i.value) for i in ivs]


INC_VAT = [
    (utc(2026, 1, 15, 11, 30), utc(2026, 1, 15, 12), -0.021),
    (utc(2026, 1, 15, 12), utc(2026, 1, 15, 12, 30), 0.12348),
    (utc(2026, 1, 15, 12, 30), utc(2026, 1, 15, 13), 0.1596),
    (utc(2026, 1, 15, 13), utc(2026, 1, 15, 13, 30), 0.21),
    (utc(2026, 1, 15, 13, 30), utc(2026, 1, 15, 14), 0.2415),
]


def test_registered() -> None:
    assert PRICE_SOURCES["octopus"] == (octopus.Config, octopus.build)
    cfg = octopus.Config(type="octopus", product_code=PRODUCT, tariff_code=TARIFF)
    assert cfg.base_url == "https://api.octopus.energy" and cfg.include_vat is True


def test_follows_next_from_the_real_host_on_the_configured_base(server: FixtureServer) -> None:
    server.routes[PATH] = two_pages
    result = make(server).fetch(NOW)
    first, second = server.requests
    assert first.path == PATH
    assert first.query == {"period_from": ["2026-01-14T12:00:00Z"], "period_to": ["2026-01-17T12:00:00Z"]}
    assert "authorization" not in first.headers  # public product: no key sent
    # `next` named api.octopus.energy; its path and query were replayed against base_url.
    assert second.path == PATH
    assert second.query == {"page": ["2"], "period_from": ["2026-01-14T12:00:00Z"],
                            "period_to": ["2026-01-17T12:00:00Z"]}
    assert result.currency == "GBP"
    assert spans(result.intervals) == INC_VAT  # newest-first pages come back oldest first
    assert result.notes == {}


def test_exc_vat(server: FixtureServer) -> None:
    server.routes[PATH] = two_pages
    values = [i.value for i in make(server, include_vat=False).fetch(NOW).intervals]
    assert values == [-0.02, 0.1176, 0.152, 0.2, 0.23]


def test_follows_next_on_the_same_host_as_given(server: FixtureServer) -> None:
    def handler(req: Request) -> Response:
        if req.query.get("page") == ["2"]:
            return json_response(PAGE2)
        body = json.loads(PAGE1)
        body["next"] = f"{server.base_url}{PATH}?page=2&marker=same-host"
        return json_response(json.dumps(body))
    server.routes[PATH] = handler
    result = make(server).fetch(NOW)
    assert server.requests[1].query == {"page": ["2"], "marker": ["same-host"]}
    assert len(result.intervals) == 5


def test_rebases_next_under_a_base_path(server: FixtureServer) -> None:
    def handler(req: Request) -> Response:
        if req.query.get("page") == ["2"]:
            return json_response(PAGE2)
        body = json.loads(PAGE1)
        body["next"] = f"http://attacker.invalid:9{PATH}?page=2"
        return json_response(json.dumps(body))
    server.routes["/proxy/octopus" + PATH] = handler
    result = make(server, base_path="/proxy/octopus").fetch(NOW)
    assert [r.path for r in server.requests] == ["/proxy/octopus" + PATH] * 2
    assert len(result.intervals) == 5


def test_page_cap_keeps_what_was_read(server: FixtureServer) -> None:
    def endless(req: Request) -> Response:
        page = int(req.query.get("page", ["1"])[0])
        body = json.loads(PAGE1)
        body["next"] = f"https://api.octopus.energy{PATH}?page={page + 1}"
        shift = (page - 1) * 5400
        for row in body["results"]:
            for key in ("valid_from", "valid_to"):
                t = datetime.fromisoformat(row[key].replace("Z", "+00:00")).timestamp() - shift
                row[key] = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json_response(json.dumps(body))
    server.routes[PATH] = endless
    result = make(server, max_pages=3).fetch(NOW)
    assert len(server.requests) == 3
    assert len(result.intervals) == 9
    assert "truncated" in result.notes


def test_next_that_loops_is_malformed(server: FixtureServer) -> None:
    body = json.loads(PAGE1)
    body["next"] = f"https://api.octopus.energy{PATH}?page=2"
    server.routes[PATH] = json_response(json.dumps(body))
    exc = fetch_error(make(server))
    assert exc.reason == "malformed" and "already read" in str(exc)
    assert len(server.requests) == 2


def test_open_ended_rates_and_payment_method(server: FixtureServer) -> None:
    path = "/v1/products/VAR-22-11-01/electricity-tariffs/E-1R-VAR-22-11-01-C/standard-unit-rates/"
    server.routes[path] = json_response(fixture("octopus", "fixed_open_ended.json"))
    kw = {"product_code": "VAR-22-11-01", "tariff_code": "E-1R-VAR-22-11-01-C"}
    exc = fetch_error(make(server, **kw))
    assert exc.reason == "malformed" and "payment_method" in str(exc)
    result = make(server, payment_method="DIRECT_DEBIT", **kw).fetch(NOW)
    # valid_to null: valid until further notice, so until the end of the requested window
    assert spans(result.intervals) == [(utc(2025, 10, 1), utc(2026, 1, 17, 12), 0.244965)]
    result = make(server, payment_method="NON_DIRECT_DEBIT", include_vat=False, **kw).fetch(NOW)
    assert result.intervals[0].value == 0.245


def test_null_values_are_skipped_not_zero(server: FixtureServer) -> None:
    body = json.loads(PAGE2)
    body["results"][0]["value_inc_vat"] = None
    server.routes[PATH] = json_response(json.dumps(body))
    assert spans(make(server).fetch(NOW).intervals) == [INC_VAT[0]]
    body["results"][1]["value_inc_vat"] = None
    server.routes[PATH] = json_response(json.dumps(body))
    assert fetch_error(make(server)).reason == "no_data"


def _page(mutate: Any) -> bytes:
    body = json.loads(PAGE2)
    mutate(body)
    return json.dumps(body).encode()


def _slow(req: Request) -> Response:
    time.sleep(0.6)  # past the client's 0.2 s timeout
    return 200, {}, b""  # nothing left to write to the closed socket


@pytest.mark.parametrize(("route", "reason", "needle"), [
    (json_response(b'{"count": 5, "results": [{"value_inc_vat": 1'), "malformed", "not valid JSON"),
    (json_response(b"<html>gateway</html>"), "malformed", "not valid JSON"),
    (json_response(b'{"count": 1, "results": [{"value_inc_vat": NaN, "valid_from": "2026-01-15T12:00:00Z"}]}'),
     "malformed", "not valid JSON"),
    (json_response(_page(lambda b: b.pop("results"))), "missing_field", "'results'"),
    (json_response(_page(lambda b: b.update(results={"a": 1}))), "malformed", "'results'"),
    (json_response(_page(lambda b: b["results"][1].pop("valid_from"))), "missing_field", "'valid_from'"),
    (json_response(_page(lambda b: b["results"][1].pop("valid_to"))), "missing_field", "'valid_to'"),
    (json_response(_page(lambda b: b["results"][0].pop("value_inc_vat"))), "missing_field", "'value_inc_vat'"),
    (json_response(_page(lambda b: b["results"][0].update(value_inc_vat="12.3"))), "malformed", "not a number"),
    (json_response(_page(lambda b: b["results"][0].update(valid_from="yesterday"))), "malformed", "valid_from"),
    (json_response(_page(lambda b: b["results"][0].update(value_inc_vat=123456.7))), "invalid_value", "123456.7"),
    (json_response(_page(lambda b: b["results"][0].update(valid_to="2026-01-15T11:00:00Z"))), "malformed",
     "valid_to"),
    (json_response(_page(lambda b: b["results"][0].update(valid_from="2026-01-15T11:45:00Z"))), "malformed",
     "overlap"),
    (json_response(_page(lambda b: b.update(next=7))), "malformed", "'next'"),
    (json_response(_page(lambda b: b["results"].append("rate"))), "malformed", "results[2]"),
    (json_response(fixture("octopus", "empty.json")), "no_data", "no rates"),
    (json_response(fixture("octopus", "not_found.json"), status=404), "http_4xx", "No EnergyProduct"),
    (json_response(b'{"detail": "Internal error"}', status=500), "http_5xx", "HTTP 500"),
    (json_response(b'{"detail": "Request was throttled."}', status=429, **{"Retry-After": "30"}),
     "rate_limited", "HTTP 429"),
    (_slow, "timeout", "timed out"),
])
def test_errors(server: FixtureServer, route: Any, reason: str, needle: str) -> None:
    server.routes[PATH] = route
    exc = fetch_error(make(server, timeout_seconds=0.2))
    assert exc.reason == reason, str(exc)
    assert needle in str(exc)
    assert f"GET {PATH}" in str(exc)
    if reason == "rate_limited":
        assert exc.retry_after == 30.0


def test_api_key_is_sent_as_basic_auth_and_never_shown(server: FixtureServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, CANARY)

    def reject(req: Request) -> Response:
        return json_response(json.dumps({"detail": f"Invalid API key {CANARY}"}), status=401)
    server.routes[PATH] = reject
    src = make(server, api_key_env=ENV)
    assert src.secrets() == (CANARY,)
    exc = fetch_error(src)
    assert exc.reason == "auth"
    expected = "Basic " + base64.b64encode(f"{CANARY}:".encode()).decode()
    assert server.requests[0].headers["authorization"] == expected


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


def test_next_poll_waits_for_tomorrows_publication() -> None:
    now = utc(2026, 1, 15, 17)  # 17:00 GMT, tomorrow's rates out until 23:00 tomorrow
    full = (Interval(utc(2026, 1, 15, 16, 30), utc(2026, 1, 16, 23), 0.2),)
    assert octopus.OctopusSource.next_poll(now, full) == utc(2026, 1, 16, 16) - now
    partial = (Interval(utc(2026, 1, 15, 16, 30), utc(2026, 1, 15, 23), 0.2),)
    assert octopus.OctopusSource.next_poll(now, partial) is None


@pytest.mark.parametrize(("kw", "needle"), [
    ({"tariff_code": "E-1R-GO-VAR-22-10-14-C"}, "does not belong"),
    ({"tariff_code": "G-1R-AGILE-24-10-01-C"}, "electricity tariff code"),
    ({"tariff_code": "E-1R-AGILE-24-10-01-Z"}, "electricity tariff code"),
    ({"product_code": "agile 24"}, "product_code"),
    ({"max_pages": 0}, "max_pages"),
])
def test_config_errors(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        octopus.Config.model_validate({"type": "octopus", "product_code": PRODUCT, "tariff_code": TARIFF, **kw})
