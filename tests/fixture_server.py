"""Replaying recorded API fixtures (tests/fixtures/) over real sockets.

The server is bench.gridfixture.FixtureServer, the repository's one fake grid API server: it lives in
bench/ because the benchmarks must run from a checkout without the test tree, and the tests may import
bench (never the reverse). This module adds what only the tests need: the fixture files and the
response shapes the source tests answer with. Routes map a path to a Response or to a callable that
sees the recorded Request; every request is kept so tests can check headers, query strings and auth.
"""

from __future__ import annotations

from pathlib import Path

from bench.gridfixture import FixtureServer, Handler, Request, Response

__all__ = ["FIXTURES", "FixtureServer", "Handler", "Request", "Response", "fixture", "json_response",
           "xml_response"]

FIXTURES = Path(__file__).parent / "fixtures"


def json_response(body: str | bytes, status: int = 200, **headers: str) -> Response:
    return status, {"Content-Type": "application/json", **headers}, body


def xml_response(body: str | bytes, status: int = 200) -> Response:
    return status, {"Content-Type": "text/xml"}, body


def fixture(*parts: str) -> bytes:
    return FIXTURES.joinpath(*parts).read_bytes()
