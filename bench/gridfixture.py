"""The one fake grid API server of the repository, and the benchmarks' grid configuration.

FixtureServer is a real HTTP server on 127.0.0.1 that answers from routes: a path maps to a fixed
response or to a handler that sees the recorded request. A handler may also return a fault (hang, cut
the body short, reset the connection, drip the body byte by byte) instead of a response, and the
server can stop listening and come back on the same port. Every request is recorded with the time
it arrived and the time its answer (or fault) was complete.

It lives here, not under tests/, because bench/ is a tool users run from a checkout and must not need
the test tree; the tests import it from here (tests/fixture_server.py re-exports it next to their
fixture files, tests/faults_support.py builds the fault suite's programmable grid APIs on it).

The benchmarks use it as Octopus Energy's public unit-rates endpoint
(`GET /v1/products/{product}/electricity-tariffs/{tariff}/standard-unit-rates/?period_from&period_to`),
answering half-hourly rates in p/kWh, newest first, in the documented shape
`{"count", "next", "previous", "results": [{"value_exc_vat", "value_inc_vat", "valid_from", "valid_to",
"payment_method"}]}`, so a real HTTP source runs while they measure. That happens only when the daemon
has an `octopus` price source registered; otherwise the benchmarks run with static sources and say so.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server received it. Header names are lower-case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    received: float = 0.0  # time.time() when it arrived
    answered: float | None = None  # time.time() when its answer or fault was complete
    target: str = ""  # the request target exactly as sent: path and query, still URL-encoded


Response = tuple[int, dict[str, str], bytes | str]


class Wire:
    """The raw side of one exchange, for faults: answer in ways a well-behaved server never would."""

    def __init__(self, handler: BaseHTTPRequestHandler, closing: threading.Event) -> None:
        self._handler = handler
        self.closing = closing  # set when the server shuts down: long faults end early

    def head(self, status: int, headers: dict[str, str], content_length: int) -> None:
        """Status line and headers, announcing `content_length` body bytes whatever follows."""
        self._handler.send_response(status)
        for k, v in headers.items():
            self._handler.send_header(k, v)
        self._handler.send_header("Content-Length", str(content_length))
        self._handler.end_headers()
        self._handler.wfile.flush()

    def write(self, data: bytes) -> None:
        self._handler.wfile.write(data)
        self._handler.wfile.flush()

    def answer(self, response: Response) -> None:
        status, headers, body = response
        data = body.encode() if isinstance(body, str) else body
        self.head(status, headers, len(data))
        self.write(data)

    def close_after(self) -> None:
        """Close the connection once this exchange is over (no keep-alive after a fault)."""
        self._handler.close_connection = True

    def hang_up(self) -> None:
        """Shut the connection down in both directions, mid-exchange if need be."""
        self._handler.connection.shutdown(socket.SHUT_RDWR)
        self.close_after()


Fault = Callable[[Wire], None]
Handler = Callable[[Request], Response | Fault]


def hang(seconds: float, then: Response) -> Fault:
    """Say nothing for `seconds` (longer than the client's timeout), then answer late."""
    def fault(wire: Wire) -> None:
        wire.closing.wait(seconds)
        wire.answer(then)
    return fault


def cut(response: Response, keep: float = 1 / 3) -> Fault:
    """Announce the whole body, send the first `keep` of it, hang up."""
    def fault(wire: Wire) -> None:
        status, headers, body = response
        data = body.encode() if isinstance(body, str) else body
        wire.head(status, headers, len(data))
        wire.write(data[: int(len(data) * keep)])
        wire.hang_up()
    return fault


def reset() -> Fault:
    """Hang up without a byte of answer."""
    return Wire.hang_up


def drip(response: Response, interval: float, padding: int = 0,
         while_: Callable[[], bool] = lambda: True) -> Fault:
    """Headers at once, then the body (plus `padding` spaces) one byte every `interval` seconds, for as
    long as `while_()` holds: each byte well inside a read timeout, the whole never in time."""
    def fault(wire: Wire) -> None:
        status, headers, body = response
        data = (body.encode() if isinstance(body, str) else body) + b" " * padding
        wire.head(status, headers, len(data))
        for i in range(len(data)):
            if not while_() or wire.closing.is_set():
                break
            wire.write(data[i:i + 1])
            time.sleep(interval)
        wire.close_after()
    return fault


class _Listener(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Timeout tests hang up before the server answers: that broken pipe is expected, not news.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass
class FixtureServer:
    """A real HTTP server on 127.0.0.1 that replays routes and records every request.

    `routes` maps a path to a Response or to a Handler; an unknown path gets 404. `keep_alive` speaks
    HTTP/1.1 with persistent connections (a client's pool reuses them, as against a real API).
    `refuse()` stops listening and drops open connections, `reopen()` listens on the same port again.
    """

    routes: dict[str, Handler | Response] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    keep_alive: bool = False

    def __post_init__(self) -> None:
        self.closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._bind(0)  # bound now, so base_url is known before the server is entered

    # -- lifecycle --------------------------------------------------------------------------------

    def _bind(self, port: int) -> None:
        self._httpd = _Listener(("127.0.0.1", port), self._handler_class())
        self.port = int(self._httpd.server_address[1])

    def _start(self) -> None:
        assert self._httpd is not None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fixture-server-{self.port}", daemon=True)
        self._thread.start()

    def __enter__(self) -> FixtureServer:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.refuse()

    def refuse(self) -> None:
        """Stop listening and drop open keep-alive connections: every request fails until reopen()."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reopen(self) -> None:
        """Listen again on the same port after refuse()."""
        if self._httpd is None:
            self._bind(self.port)
            self._start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- serving ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                server._connections.add(self.connection)

            def finish(self) -> None:
                server._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(self.command, parts.path, parse_qs(parts.query),
                              {k.lower(): v for k, v in self.headers.items()},
                              self.rfile.read(length) if length else b"", received=time.time(),
                              target=self.path)
                server.requests.append(req)
                route = server.routes.get(parts.path)
                try:
                    if route is None:
                        answer: Response | Fault = (404, {"Content-Type": "text/plain"}, b"no route")
                    elif callable(route):
                        answer = route(req)
                    else:
                        answer = route
                    wire = Wire(self, server.closing)
                    if callable(answer):
                        answer(wire)
                    else:
                        wire.answer(answer)
                except OSError:
                    self.close_connection = True  # the client gave up (a timeout): the point of some faults
                finally:
                    req.answered = time.time()

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:  # silence test output
                pass

        return _Handler


# ---------------------------------------------------------------------------------------------------
# The benchmarks' price API and grid configuration
# ---------------------------------------------------------------------------------------------------

PRODUCT = "AGILE-24-10-01"
TARIFF = "E-1R-AGILE-24-10-01-C"
RATES_PATH = f"/v1/products/{PRODUCT}/electricity-tariffs/{TARIFF}/standard-unit-rates/"
HALF_HOUR = 1800


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def rates_body(period_from: float, period_to: float) -> bytes:
    """Half-hourly rates covering [period_from, period_to), newest first, with a daily price shape."""
    start = math.floor(period_from / HALF_HOUR) * HALF_HOUR
    rows = []
    t = start
    while t < period_to:
        hour = (t % 86400) / 3600
        exc = round(18.0 + 9.0 * math.sin(2 * math.pi * (hour - 11) / 24), 4)
        rows.append({"value_exc_vat": exc, "value_inc_vat": round(exc * 1.05, 4),
                     "valid_from": _iso(t), "valid_to": _iso(t + HALF_HOUR), "payment_method": None})
        t += HALF_HOUR
    rows.reverse()
    return json.dumps({"count": len(rows), "next": None, "previous": None, "results": rows}).encode()


def _unit_rates(req: Request) -> Response:
    json_type = {"Content-Type": "application/json"}
    if "period_from" not in req.query or "period_to" not in req.query:
        return 404, json_type, b'{"detail": "Not found."}'
    return 200, json_type, rates_body(_parse(req.query["period_from"][0]), _parse(req.query["period_to"][0]))


def price_api() -> FixtureServer:
    """The unit-rates endpoint on a FixtureServer (enter it to serve); its `requests` are the fetches."""
    return FixtureServer(routes={RATES_PATH: _unit_rates})


def http_price_source_available() -> bool:
    """True when the daemon under test has the octopus source registered (grid work may land later)."""
    from wattson.grid.registry import PRICE_SOURCES

    return "octopus" in PRICE_SOURCES


def daemon_config(interval_seconds: float, price_api_url: str | None) -> str:
    """Grid on: static carbon intensity, price from the HTTP source (with a static fallback) or static,
    and budgets, so the exposition has every family a production config has."""
    if price_api_url is not None:
        price = (f"  price:\n    zone: GB\n    sources:\n"
                 f"      - {{type: octopus, base_url: '{price_api_url}', product_code: {PRODUCT}, "
                 f"tariff_code: {TARIFF}}}\n"
                 f"      - {{type: static, price_per_kwh: 0.25, currency: GBP}}\n")
        currency = "GBP"
    else:
        price = "  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.30, currency: EUR}]}\n"
        currency = "EUR"
    return (f"sampler: {{interval_seconds: {interval_seconds}}}\n"
            "grid:\n  pue: 1.2\n"
            "  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}\n"
            f"{price}"
            f"budgets: {{currency: {currency}, cost_per_day: 50, cost_per_month: 1500,"
            " co2e_grams_per_day: 200000, carbon_intensity_threshold_grams_per_kwh: 300}\n")
