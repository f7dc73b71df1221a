"""Shared machinery of the fault suite (tests/test_faults_*.py) and the soak run (tests/test_soak.py).

Holds no tests. Everything here drives the real daemon from the outside: a programmable stand-in
for the grid APIs on 127.0.0.1, a background scraper that checks every scrape (status, latency,
counters never decreasing), an exposition parser, and readers for the daemon's RSS.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from tests.daemon import get

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------
# Exposition parsing
# ---------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Metrics:
    """One parsed /metrics body: samples by (name, sorted labels), and each family's TYPE."""

    samples: dict[SampleKey, float]
    types: dict[str, str]
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[SampleKey, float] = {}
        types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                types[name] = kind.strip()
                continue
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m is None:
                raise AssertionError(f"unparsable exposition line: {line!r}")
            name, labels_text, value = m.groups()
            labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\\\", "\\"))
                                  for k, v in _LABEL.findall(labels_text or "")))
            samples[(name, labels)] = float(value)
        return cls(samples, types, text)

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of `name` whose labels include `labels`."""
        out = []
        for (n, lv), value in self.samples.items():
            if n != name:
                continue
            d = dict(lv)
            if all(d.get(k) == v for k, v in labels.items()):
                out.append((d, value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample matching; None when absent. Two matches is a test bug."""
        found = self.find(name, **labels)
        if len(found) > 1:
            raise AssertionError(f"{name}{labels} matches {len(found)} series: {[d for d, _ in found]}")
        return found[0][1] if found else None

    def must(self, name: str, **labels: str) -> float:
        v = self.value(name, **labels)
        if v is None:
            raise AssertionError(f"{name}{labels} is absent from /metrics")
        return v

    def counters(self) -> dict[SampleKey, float]:
        """Samples of counter families (`<family>_total`)."""
        return {k: v for k, v in self.samples.items()
                if k[0].endswith("_total") and self.types.get(k[0][: -len("_total")]) == "counter"}

    def signal_source(self, signal: str) -> str | None:
        found = self.find("wattson_grid_signal_info", signal=signal)
        return found[0][0]["source"] if found else None

    def source_errors(self, source: str) -> dict[str, float]:
        return {d["reason"]: v for d, v in self.find("wattson_source_errors_total", source=source)}

    def gpu_errors(self, gpu: int) -> dict[str, float]:
        return {d["error"]: v for d, v in self.find("wattson_sampler_errors_total", gpu=str(gpu))}


def counter_decreases(before: Metrics, after: Metrics) -> list[str]:
    """Every counter sample that went down (or vanished) between two scrapes."""
    out = []
    now = after.counters()
    for key, old in before.counters().items():
        new = now.get(key)
        if new is None:
            out.append(f"{key[0]}{dict(key[1])} vanished (was {old!r})")
        elif new < old:
            out.append(f"{key[0]}{dict(key[1])} decreased {old!r} -> {new!r}")
    return out


def scrape(base: str, timeout: float = 5.0) -> Metrics:
    status, _headers, body = get(base + "/metrics", timeout=timeout)
    if status != 200:
        raise AssertionError(f"/metrics answered HTTP {status}")
    return Metrics.parse(body.decode())


# ---------------------------------------------------------------------------------------------------
# Background scraper
# ---------------------------------------------------------------------------------------------------


class Scraper(threading.Thread):
    """Scrapes /metrics in a loop and checks each scrape against the one before.

    Keeps every latency, every failure (non-200, socket error) and every counter decrease, so a test
    can assert on them after the fault and the soak can report them.
    """

    def __init__(self, base: str, period_seconds: float = 0.1, timeout_seconds: float = 5.0,
                 parse: bool = True, keep_history: bool = True) -> None:
        super().__init__(name="scraper", daemon=True)
        self.keep_history = keep_history
        self.history: list[Metrics] = []
        self.base = base
        self.period = period_seconds
        self.timeout = timeout_seconds
        self.parse = parse
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.decreases: list[str] = []
        self.last: Metrics | None = None
        self.first: Metrics | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            try:
                status, _h, body = get(self.base + "/metrics", timeout=self.timeout)
            except OSError as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                status, body = None, b""
            self.latencies.append(time.monotonic() - t0)
            if status is not None and status != 200:
                self.failures.append(f"{time.strftime('%H:%M:%S')} HTTP {status}")
            elif status == 200 and self.parse:
                m = Metrics.parse(body.decode())
                with self._lock:
                    if self.last is not None:
                        self.decreases.extend(counter_decreases(self.last, m))
                    if self.first is None:
                        self.first = m
                    self.last = m
                    if self.keep_history:
                        self.history.append(m)
            self._stop_event.wait(self.period)

    def since(self, m: Metrics) -> list[Metrics]:
        """The scrapes from `m` (included) on."""
        with self._lock:
            return self.history[next(i for i, h in enumerate(self.history) if h is m):]

    def when(self, condition: Callable[[Metrics], bool]) -> Metrics | None:
        """The latest scrape if it satisfies `condition`, else None (a wait_for probe)."""
        m = self.latest()
        return m if condition(m) else None

    def latest(self) -> Metrics:
        with self._lock:
            if self.last is None:
                raise AssertionError("no successful scrape yet")
            return self.last

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout + 2)

    def __enter__(self) -> Scraper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def assert_healthy(self, max_latency_seconds: float = 1.0, min_scrapes: int = 5) -> None:
        """Every scrape answered 200 within the bound and no counter went down."""
        assert not self.failures, f"{len(self.failures)} failed scrapes: {self.failures[:5]}"
        assert not self.decreases, f"counters decreased: {self.decreases[:5]}"
        assert len(self.latencies) >= min_scrapes, f"only {len(self.latencies)} scrapes"
        worst = max(self.latencies)
        assert worst < max_latency_seconds, f"slowest scrape took {worst:.3f}s (bound {max_latency_seconds}s)"


# ---------------------------------------------------------------------------------------------------
# Waiting and process state
# ---------------------------------------------------------------------------------------------------


class Abort(Exception):
    """Raised by a wait_for probe to stop waiting at once: the state can no longer become right."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` and the last error."""
    deadline = time.monotonic() + timeout
    last_error: str = ""
    while True:
        try:
            value = probe()
            if value:
                return value
        except (AssertionError, OSError, KeyError, ValueError) as exc:
            last_error = f" (last: {type(exc).__name__}: {exc})"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{last_error}")
        time.sleep(interval)


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads in /proc/{pid}/status")


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else 0.0


# ---------------------------------------------------------------------------------------------------
# A programmable grid API: Electricity Maps (carbon), aWATTar (price), ENTSO-E (price, echo only)
# ---------------------------------------------------------------------------------------------------

EM_PATHS = ("/v3/carbon-intensity/history", "/v3/carbon-intensity/latest", "/v3/carbon-intensity/forecast")
AWATTAR_PATH = "/v1/marketdata"
ENTSOE_PATH = "/api"

# Modes a test can set per API. "ok" serves good data for the current hours.
MODES = ("ok", "http_500", "http_401", "rate_limited", "hang", "cut", "reset", "truncated_json", "malformed",
         "wrong_zone", "wrong_units", "absurd", "empty", "slowloris",
         "echo_500", "echo_401", "echo_zone", "echo_value", "echo_boundary", "echo_ack",
         "echo_ack_boundary")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Hit:
    api: str
    path: str
    mode: str
    received: float  # time.time() when the request arrived
    answered: float | None = None  # when the response (or the fault) was complete


@dataclass
class GridApi:
    """A local stand-in for three grid APIs whose behaviour a test switches while the daemon runs.

    `modes[api]` picks what each API does next ("ok" or a fault). Requests are logged with their
    arrival time so tests can check pacing (Retry-After). `refuse()` closes the listening socket
    (connection refused) and `reopen()` binds the same port again.
    """

    carbon_grams_per_kwh: float = 123.0
    price_eur_per_mwh: float = 200.0
    zone: str = "DE"
    retry_after: str = "3"
    hang_seconds: float = 3.0
    drip_seconds: float = 0.25
    modes: dict[str, str] = field(default_factory=lambda: {"electricitymaps": "ok", "awattar": "ok",
                                                           "entsoe": "ok"})
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def _serve(self, port: int) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="grid-api", daemon=True)
        self._thread.start()

    def __enter__(self) -> GridApi:
        self._serve(0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.refuse()

    def refuse(self) -> None:
        """Stop listening and drop open keep-alive connections: every request fails until reopen()."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reopen(self) -> None:
        if self._httpd is None:
            self._serve(self.port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, *apis: str) -> None:
        for api in apis or tuple(self.modes):
            assert mode in MODES, mode
            self.modes[api] = mode

    def hits_of(self, api: str) -> list[Hit]:
        return [h for h in list(self.hits) if h.api == api]

    # -- payloads ---------------------------------------------------------------------------------

    def em_entry(self, start: float, zone: str | None = None, value: Any = "default") -> dict[str, Any]:
        return {"zone": zone or self.zone,
                "carbonIntensity": self.carbon_grams_per_kwh if value == "default" else value,
                "datetime": _iso(start), "updatedAt": _iso(time.time()), "createdAt": _iso(start - 86400),
                "emissionFactorType": "lifecycle", "isEstimated": False, "estimationMethod": None}

    def em_body(self, path: str, mode: str, secret: str) -> dict[str, Any]:
        hour = (time.time() // 3600) * 3600
        zone = {"wrong_zone": "FR", "echo_zone": secret}.get(mode, self.zone)
        faulty: dict[str, Any] = {"absurd": 250_000.0, "empty": None, "echo_value": f"n/a for {secret}"}
        value = faulty.get(mode, "default")
        if path.endswith("/latest"):
            return self.em_entry(hour, zone, value)
        key = "forecast" if path.endswith("/forecast") else "history"
        hours = range(1, 25) if key == "forecast" else range(-24, 0)
        entries = [] if mode == "empty" else [self.em_entry(hour + k * 3600, zone, value) for k in hours]
        if key == "forecast":
            entries = [{"carbonIntensity": e["carbonIntensity"], "datetime": e["datetime"]} for e in entries]
        return {"zone": zone, key: entries}

    def awattar_body(self, mode: str) -> dict[str, Any]:
        hour = (time.time() // 3600) * 3600
        price: Any = {"absurd": 9.9e9, "echo_value": "n/a"}.get(mode, self.price_eur_per_mwh)
        unit = "Eur/kWh" if mode == "wrong_units" else "Eur/MWh"
        rows = [] if mode == "empty" else [
            {"start_timestamp": int((hour + k * 3600) * 1000),
             "end_timestamp": int((hour + (k + 1) * 3600) * 1000),
             "marketprice": price, "unit": unit} for k in range(-24, 24)]
        return {"object": "list", "data": rows, "url": "/at/v1/marketdata" if mode == "wrong_zone"
                else "/de/v1/marketdata"}

    # -- the handler ------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api_server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                api_server._connections.add(self.connection)

            def finish(self) -> None:
                api_server._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path in EM_PATHS:
                    api = "electricitymaps"
                elif parts.path == AWATTAR_PATH:
                    api = "awattar"
                elif parts.path == ENTSOE_PATH:
                    api = "entsoe"
                else:
                    self._reply(404, b"no such path\n", "text/plain")
                    return
                mode = api_server.modes[api]
                hit = Hit(api, parts.path, mode, time.time())
                api_server.hits.append(hit)
                secret = (self.headers.get("auth-token") or
                          (parse_qs(parts.query).get("securityToken") or [""])[0])
                try:
                    self._fault(api, parts.path, mode, secret)
                except OSError:
                    pass  # the client gave up (timeout): that is the point of some modes
                finally:
                    hit.answered = time.time()

            def _reply(self, status: int, body: bytes, ctype: str = "application/json",
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _good(self, api: str, path: str, mode: str, secret: str) -> bytes:
                if api == "electricitymaps":
                    return json.dumps(api_server.em_body(path, mode, secret)).encode()
                if api == "awattar":
                    return json.dumps(api_server.awattar_body(mode)).encode()
                return b"<xml/>"  # ENTSO-E is only used for the echo faults

            def _fault(self, api: str, path: str, mode: str, secret: str) -> None:
                s = api_server
                if mode in ("ok", "wrong_zone", "wrong_units", "absurd", "empty", "echo_zone", "echo_value"):
                    self._reply(200, self._good(api, path, mode, secret))
                elif mode == "http_500":
                    self._reply(500, b'{"status": "error", "message": "Internal Server Error"}')
                elif mode == "http_401":
                    self._reply(401, b'{"status": "error", "message": "Unauthorized"}')
                elif mode == "rate_limited":
                    self._reply(429, b'{"status": "error", "message": "Too many requests"}',
                                headers={"Retry-After": s.retry_after})
                elif mode == "hang":
                    s._closing.wait(s.hang_seconds)  # longer than the client's timeout; then a late answer
                    self._reply(200, self._good(api, path, "ok", secret))
                elif mode == "cut":
                    body = self._good(api, path, "ok", secret)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif mode == "truncated_json":
                    body = self._good(api, path, "ok", secret)
                    self._reply(200, body[: len(body) // 2])
                elif mode == "malformed":
                    self._reply(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>")
                elif mode == "slowloris":
                    # Headers at once, then the body one byte at a time, each well inside the client's
                    # read timeout, for as long as the mode lasts.
                    body = self._good(api, path, "ok", secret) + b" " * 100_000
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.flush()
                    for i in range(len(body)):
                        if s.modes[api] != "slowloris" or s._closing.is_set():
                            break
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(s.drip_seconds)
                    self.close_connection = True
                elif mode == "echo_500":
                    body = {"message": f"internal error for key {secret}", "request": self.path}
                    self._reply(500, json.dumps(body).encode())
                elif mode == "echo_401":
                    self._reply(401, json.dumps({"message": f"Invalid token '{secret}'",
                                                 "url": self.path}).encode())
                elif mode == "echo_boundary":
                    # The key straddles character 160 of the body, where error snippets are cut.
                    prefix = ('{"message": "' + "request rejected; " * 8)[:140]
                    self._reply(403, (prefix + secret + '"}').encode())
                elif mode in ("echo_ack", "echo_ack_boundary"):
                    # echo_ack_boundary: the key straddles character 200 of the text, where it is cut.
                    pad = "Invalid security token "
                    if mode == "echo_ack_boundary":
                        pad += "." * (180 - len(pad))
                    doc = ('<?xml version="1.0" encoding="utf-8"?><Acknowledgement_MarketDocument '
                           'xmlns="urn:iec62325.351:tc57wg16:451-1:acknowledgementdocument:7:0">'
                           f"<Reason><code>999</code><text>{pad}{secret}</text></Reason>"
                           "</Acknowledgement_MarketDocument>")
                    self._reply(200, doc.encode(), "text/xml")
                else:  # pragma: no cover - MODES and this list are kept together
                    raise AssertionError(f"mode {mode} not implemented")

        return Handler


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------

STATIC_CARBON = 456.0
STATIC_PRICE = 0.30


def grid_config(api: GridApi, *, timeout_seconds: float = 0.5, max_age_seconds: float = 2.0,
                poll_interval_seconds: float = 1.0, em_key_env: str = "WATTSON_TEST_EM_KEY") -> str:
    """Two chains whose first source is the local API and whose fallback is a static value."""
    return f"""
  carbon:
    zone: DE
    max_age_seconds: {max_age_seconds}
    sources:
      - {{type: electricitymaps, base_url: "{api.base_url}", api_key_env: {em_key_env}, use_forecast: false,
          timeout_seconds: {timeout_seconds}, poll_interval_seconds: {poll_interval_seconds}}}
      - {{type: static, grams_per_kwh: {STATIC_CARBON}}}
  price:
    zone: DE
    max_age_seconds: {max_age_seconds}
    sources:
      - {{type: awattar, base_url: "{api.base_url}", timeout_seconds: {timeout_seconds},
          poll_interval_seconds: {poll_interval_seconds}}}
      - {{type: static, price_per_kwh: {STATIC_PRICE}, currency: EUR}}
"""


def simulated_config(grid: str, gpus: int = 2, interval_seconds: float = 0.2) -> str:
    return f"""
gpu:
  backend: simulated
  simulated: {{count: {gpus}, profiles: [training, inference], seed: 3}}
sampler: {{interval_seconds: {interval_seconds}}}
grid:{grid}
"""


STATIC_GRID = f"""
  carbon: {{zone: DE, sources: [{{type: static, grams_per_kwh: {STATIC_CARBON}}}]}}
  price: {{zone: DE, sources: [{{type: static, price_per_kwh: {STATIC_PRICE}, currency: EUR}}]}}
"""
