"""ENTSO-E day-ahead prices against recorded-shape fixtures served over real sockets."""

from __future__ import annotations

import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.fixture_server import FixtureServer, Request, Response, fixture, xml_response
from wattson.grid import entsoe
from wattson.grid.base import SourceError
from wattson.grid.registry import PRICE_SOURCES

CANARY = "canary-entsoe-token-7f3a9c51"
ENV = "WATTSON_TEST_ENTSOE_TOKEN"
DE_LU = "10Y1001A1001A82H"


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def make(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, zone: str = "DE-LU",
         **kw: object) -> entsoe.EntsoeSource:
    monkeypatch.setenv(ENV, CANARY)
    cfg = entsoe.Config.model_validate({"type": "entsoe", "base_url": server.base_url, "api_key_env": ENV,
                                        "timeout_seconds": 2, **kw})
    return entsoe.build(cfg, zone)





def serve(server: FixtureServer, body: bytes | str, status: int = 200) -> FixtureServer:
    server.routes["/api"] = xml_response(body, status)
    return server


def fetch_error(src: entsoe.EntsoeSource, now: float) -> SourceError:
    with pytest.raises(SourceError) as info:
        src.fetch(now)
    assert CANARY not in str(info.value)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("entsoe: ")
    return info.value


DE_LU_DOC = fixture("entsoe", "a44_de_lu_two_days.xml").decode()
NOW_DE = utc(2026, 6, 15, 10)  # 12:00 CEST, tomorrow already published


def test_registered() -> None:
    assert PRICE_SOURCES["entsoe"] == (entsoe.Config, entsoe.build)


def test_de_lu_picks_sequence_1_and_expands_a03_gaps(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, DE_LU_DOC)
    result = make(server, monkeypatch).fetch(NOW_DE)
    d0 = utc(2026, 6, 14, 22)
    q = 900
    expected = [
        (d0, d0 + q, 0.12345),
        (d0 + q, d0 + 4 * q, 0.11),  # positions 2-4: 3, 4 omitted, repeat 110.00
        (d0 + 4 * q, d0 + 40 * q, -0.00501),
        (d0 + 40 * q, d0 + 41 * q, 0.0),
        (d0 + 41 * q, d0 + 89 * q, 0.2501),
        (d0 + 89 * q, d0 + 96 * q, 0.09999),  # the gap runs to the end of the period
        (utc(2026, 6, 15, 22), utc(2026, 6, 16, 10), 0.08),
        (utc(2026, 6, 16, 10), utc(2026, 6, 16, 22), 0.0955),
    ]
    assert [(i.start, i.end, i.value) for i in result.intervals] == expected
    assert result.currency == "EUR"
    assert not any(i.forecast or i.estimated for i in result.intervals)
    # Tomorrow is complete: nothing new before tomorrow's 13:00 CEST publication.
    assert result.next_poll_seconds == utc(2026, 6, 16, 11) - NOW_DE


def test_request_parameters(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, DE_LU_DOC)
    make(server, monkeypatch).fetch(NOW_DE)
    (req,) = server.requests
    assert req.method == "GET" and req.path == "/api"
    assert req.query == {
        "documentType": ["A44"],
        "in_Domain": [DE_LU],
        "out_Domain": [DE_LU],
        "periodStart": ["202606142200"],  # today 00:00 CEST
        "periodEnd": ["202606162200"],  # end of tomorrow
        "securityToken": [CANARY],
    }
    assert req.headers["user-agent"].startswith("wattson/")


def test_winter_window_starts_at_2300z(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, fixture("entsoe", "ack_no_data.xml"))
    src = make(server, monkeypatch)
    fetch_error(src, utc(2026, 1, 10, 12))
    (req,) = server.requests
    assert req.query["periodStart"] == ["202601092300"]
    assert req.query["periodEnd"] == ["202601112300"]


def test_older_namespace_hourly_today_only(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, fixture("entsoe", "a44_fr_today_only.xml"))
    src = make(server, monkeypatch, zone="FR")
    early = src.fetch(utc(2026, 6, 15, 8))  # 10:00 CEST, before publication
    late = src.fetch(utc(2026, 6, 15, 12))  # 14:00 CEST, tomorrow still missing
    assert server.requests[0].query["in_Domain"] == ["10YFR-RTE------C"]
    ivs = early.intervals
    assert len(ivs) == 24
    assert ivs[0].start == utc(2026, 6, 14, 22) and ivs[-1].end == utc(2026, 6, 15, 22)
    assert all(b.start == a.end == a.start + 3600 for a, b in zip(ivs, ivs[1:], strict=False))
    assert ivs[2].value == 0.03702  # 37.02 EUR/MWh, exact
    assert ivs[23].value == 0.29616
    assert early.next_poll_seconds == 3 * 3600  # until 13:00 CEST
    assert late.next_poll_seconds is None  # keep polling at the hourly pace


def test_spring_forward_day_has_92_quarter_hours(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, fixture("entsoe", "a44_at_spring_dst.xml"))
    result = make(server, monkeypatch, zone="AT").fetch(utc(2026, 3, 29, 10))
    assert server.requests[0].query["periodStart"] == ["202603282300"]
    assert server.requests[0].query["periodEnd"] == ["202603302200"]
    ivs = result.intervals
    assert len(ivs) == 92
    assert ivs[0].start == utc(2026, 3, 28, 23)
    assert ivs[-1].end == utc(2026, 3, 29, 22)
    assert sum(i.end - i.start for i in ivs) == 23 * 3600
    assert all(i.end - i.start == 900 for i in ivs)
    assert ivs[0].value == 0.05025 and ivs[91].value == 0.073


def test_fall_back_day_has_25_hours(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, fixture("entsoe", "a44_at_autumn_dst.xml"))
    result = make(server, monkeypatch, zone="AT").fetch(utc(2026, 10, 25, 10))
    ivs = result.intervals
    assert len(ivs) == 25
    assert (ivs[0].start, ivs[-1].end) == (utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert sum(i.end - i.start for i in ivs) == 25 * 3600
    assert ivs[0].value == 0.0711 and ivs[24].value == 0.0951


def _single(points: str, resolution: str = "PT30M", curve: str = "A01", start: str = "2026-06-14T22:00Z",
            end: str = "2026-06-15T22:00Z", extra: str = "") -> str:
    return (f'<Publication_MarketDocument xmlns="urn:x"><type>A44</type><TimeSeries>'
            f'<in_Domain.mRID codingScheme="A01">{DE_LU}</in_Domain.mRID>'
            f"<currency_Unit.name>EUR</currency_Unit.name><price_Measure_Unit.name>MWH</price_Measure_Unit.name>"
            f"{extra}<curveType>{curve}</curveType><Period><timeInterval><start>{start}</start><end>{end}</end>"
            f"</timeInterval><resolution>{resolution}</resolution>{points}</Period></TimeSeries>"
            f"</Publication_MarketDocument>")


def _pt(position: int, price: str) -> str:
    return f"<Point><position>{position}</position><price.amount>{price}</price.amount></Point>"


def test_half_hour_resolution_and_a01_gap_left_unpriced(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _single(_pt(1, "10.5") + _pt(2, "11") + _pt(48, "12.25"))
    serve(server, doc)
    ivs = make(server, monkeypatch).fetch(NOW_DE).intervals
    d0 = utc(2026, 6, 14, 22)
    assert [(i.start - d0, i.end - d0, i.value) for i in ivs] == [
        (0, 1800, 0.0105), (1800, 3600, 0.011), (47 * 1800, 48 * 1800, 0.01225)]


@pytest.mark.parametrize(("body", "reason", "needle"), [
    (fixture("entsoe", "ack_no_data.xml"), "no_data", "No matching data found"),
    (fixture("entsoe", "ack_bad_request.xml"), "http_4xx", "in_Domain"),
    (fixture("entsoe", "truncated.xml"), "malformed", "not valid XML"),
    (b"<html><body>maintenance</body></html>", "malformed", "unexpected document 'html'"),
    (DE_LU_DOC.replace("<resolution>PT15M</resolution>", "", 2), "missing_field", "'resolution'"),
    (DE_LU_DOC.replace("<price.amount>123.45</price.amount>", ""), "missing_field", "'price.amount'"),
    (DE_LU_DOC.replace("<price.amount>123.45</price.amount>", "<price.amount>n/a</price.amount>"),
     "malformed", "'price.amount'"),
    (DE_LU_DOC.replace(f'<in_Domain.mRID codingScheme="A01">{DE_LU}</in_Domain.mRID>', ""),
     "missing_field", "'in_Domain.mRID'"),
    (DE_LU_DOC.replace(f">{DE_LU}</in_Domain", ">10YFR-RTE------C</in_Domain"), "wrong_zone", "10YFR-RTE------C"),
    (DE_LU_DOC.replace(">250.10<", ">250000.00<"), "invalid_value", "250000.00"),
    (DE_LU_DOC.replace(">MWH<", ">KWH<"), "invalid_value", "price_Measure_Unit.name"),
    (DE_LU_DOC.replace("<position>90</position>", "<position>97</position>"), "invalid_value", "1..96"),
    (DE_LU_DOC.replace("<curveType>A03</curveType>", "<curveType>A02</curveType>"), "malformed", "A02"),
    (DE_LU_DOC.replace("<end>2026-06-15T22:00Z</end>", "<end>2026-06-14T22:00Z</end>"),
     "malformed", "ends at or before"),
    (DE_LU_DOC.replace("AttributeInstanceComponent.position>1<", "AttributeInstanceComponent.position>3<"),
     "no_data", "position 1"),
    (_single(_pt(1, "1") + _pt(1, "2")), "malformed", "repeats"),
    (_single(""), "no_data", "no prices"),
    (_single(_pt(1, "1"), resolution="P1D"), "malformed", "'resolution'"),
    ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
     "<Publication_MarketDocument>&b;</Publication_MarketDocument>", "malformed", "not valid XML"),
])
def test_document_errors(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, body: bytes | str,
                         reason: str, needle: str) -> None:
    serve(server, body)
    exc = fetch_error(make(server, monkeypatch), NOW_DE)
    assert exc.reason == reason, str(exc)
    assert needle in str(exc)
    assert "GET /api" in str(exc)


def test_wrong_zone_when_response_is_for_another_domain(server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(server, DE_LU_DOC)
    exc = fetch_error(make(server, monkeypatch, zone="NL"), NOW_DE)
    assert exc.reason == "wrong_zone"
    assert DE_LU in str(exc) and "10YNL----------L" in str(exc)


def _echo_token(status: int, **headers: str):  # type: ignore[no-untyped-def]
    def handler(req: Request) -> Response:
        token = req.query.get("securityToken", [""])[0]
        return status, {"Content-Type": "text/html", **headers}, f"<p>token {token} rejected</p>"
    return handler


def _slow(req: Request) -> Response:
    time.sleep(0.6)  # past the client's 0.2 s timeout
    return 200, {}, b""  # nothing left to write to the closed socket


@pytest.mark.parametrize(("route", "reason"), [
    ((401, {"Content-Type": "text/html"}, fixture("entsoe", "unauthorized.html")), "auth"),
    (_echo_token(401), "auth"),
    (_echo_token(500), "http_5xx"),
    (_echo_token(503), "http_5xx"),
    (_echo_token(400), "http_4xx"),
    (_echo_token(429, **{"Retry-After": "120"}), "rate_limited"),
    (_slow, "timeout"),
])
def test_http_errors_never_leak_the_token(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, route: object,
                                          reason: str) -> None:
    server.routes["/api"] = route  # type: ignore[assignment]
    exc = fetch_error(make(server, monkeypatch, timeout_seconds=0.2), NOW_DE)
    assert exc.reason == reason
    assert "GET /api" in str(exc)
    if reason == "rate_limited":
        assert exc.retry_after == 120.0


class _ClosedPort:
    """A base_url on a port nothing listens on (bound, then closed), without a server's shutdown delay."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_connection_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = _ClosedPort()
    src = make(gone, monkeypatch)
    exc = fetch_error(src, NOW_DE)  # the server is shut down
    assert exc.reason == "connection"


def test_token_from_file_and_missing_token(server: FixtureServer, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("ENTSOE_API_KEY", raising=False)
    key_file = tmp_path / "entsoe.key"
    key_file.write_text(CANARY + "\n")
    serve(server, DE_LU_DOC)
    cfg = entsoe.Config(type="entsoe", base_url=server.base_url, api_key_file=str(key_file))
    src = entsoe.build(cfg, "DE-LU")
    assert src.secrets() == (CANARY,)
    src.fetch(NOW_DE)
    assert server.requests[0].query["securityToken"] == [CANARY]

    missing = entsoe.build(entsoe.Config(type="entsoe", base_url=server.base_url), "DE-LU")
    assert missing.secrets() == ()
    exc = fetch_error(missing, NOW_DE)
    assert exc.reason == "auth" and "ENTSOE_API_KEY" in str(exc)
    assert len(server.requests) == 1  # nothing sent without a token


def test_default_config() -> None:
    cfg = entsoe.Config(type="entsoe")
    assert cfg.base_url == "https://web-api.tp.entsoe.eu"
    assert cfg.api_key_env == "ENTSOE_API_KEY"


@pytest.mark.parametrize(("name", "eic"), [
    ("DE-LU", DE_LU), ("de_lu", DE_LU), ("DE", DE_LU), ("AT", "10YAT-APG------L"), ("FR", "10YFR-RTE------C"),
    ("NL", "10YNL----------L"), ("BE", "10YBE----------2"), ("ES", "10YES-REE------0"),
    ("IT-North", "10Y1001A1001A73I"), ("DK-1", "10YDK-1--------W"), ("10YCZ-CEPS-----N", "10YCZ-CEPS-----N"),
])
def test_zone_names(name: str, eic: str) -> None:
    assert entsoe.resolve_zone(name) == eic


def test_unknown_zone_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="EIC"):
        entsoe.Config(type="entsoe", zone="Atlantis")
    with pytest.raises(ValueError, match="Atlantis"):
        entsoe.build(entsoe.Config(type="entsoe"), "Atlantis")
