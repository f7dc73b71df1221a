"""Shared machinery of the fault suite (tests/test_faults_*.py) and the soak run (tests/test_soak.py).

Holds no tests. Everything here drives the real daemon from the outside: programmable stand-ins for
the grid APIs (built on bench.gridfixture.FixtureServer, the one fake API server), a background scraper
that checks every scrape (status, latency, counters never decreasing), parsed scrapes (prometheus_client's
parser), and readers for the daemon's RSS.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from bench.common import fit_line, rss_bytes
from bench.common import wait_for as _wait_for
from bench.gridfixture import Fault, FixtureServer, Request, Response, cut, drip, hang, reset
from tests.daemon import get

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------
# Parsed scrapes
# ---------------------------------------------------------------------------------------------------

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Metrics:
    """One parsed /metrics body: samples by (name, sorted labels), and the TYPE of each sample's family."""

    samples: dict[SampleKey, float]
    kinds: dict[str, str]  # sample name -> its family's type (counter, gauge, ...)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Parse with prometheus_client; ValueError on a body Prometheus would not accept either."""
        samples: dict[SampleKey, float] = {}
        kinds: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
                kinds[s.name] = family.type
        return cls(samples, kinds, text)

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
        """The samples of counter families (`<family>_total`; not `_created`)."""
        return {k: v for k, v in self.samples.items()
                if k[0].endswith("_total") and self.kinds.get(k[0]) == "counter"}

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
                try:
                    m = Metrics.parse(body.decode())
                except ValueError as exc:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} unparsable exposition: {exc}")
                    self._stop_event.wait(self.period)
                    continue
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
        if self.parse and self.last is not None:
            assert self.last.counters(), "no counter found in /metrics: the decrease check checked nothing"
        assert len(self.latencies) >= min_scrapes, f"only {len(self.latencies)} scrapes"
        worst = max(self.latencies)
        assert worst < max_latency_seconds, f"slowest scrape took {worst:.3f}s (bound {max_latency_seconds}s)"


# ---------------------------------------------------------------------------------------------------
# Waiting and process state
# ---------------------------------------------------------------------------------------------------


class Abort(Exception):
    """Raised by a wait_for probe to stop waiting at once: the state can no longer become right."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """bench.common.wait_for, retrying probes that fail while the state is still coming (a series not
    there yet, no scrape yet, a refused connection). Raise Abort in a probe to stop waiting at once."""
    return _wait_for(what, probe, timeout, interval, retry_on=(AssertionError, OSError, KeyError, ValueError))


def rss_mib(pid: int) -> float:
    """Resident set size of a process, in MiB (bench.common.rss_bytes)."""
    return rss_bytes(pid)[0] / (1024 * 1024)


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (bench.common.fit_line)."""
    return fit_line([x for x, _ in points], [y for _, y in points]).slope


# ---------------------------------------------------------------------------------------------------
# A programmable grid API: Electricity Maps (carbon), aWATTar (price), ENTSO-E (price, echo only)
# ---------------------------------------------------------------------------------------------------

EM_PATHS = ("/v3/carbon-intensity/history", "/v3/carbon-intensity/latest", "/v3/carbon-intensity/forecast")
AWATTAR_PATH = "/v1/marketdata"
ENTSOE_PATH = "/api"
API_OF_PATH = {**{p: "electricitymaps" for p in EM_PATHS}, AWATTAR_PATH: "awattar", ENTSOE_PATH: "entsoe"}

# Modes a test can set per API. "ok" serves good data for the current hours.
MODES = ("ok", "http_500", "http_401", "rate_limited", "hang", "cut", "reset", "truncated_json", "malformed",
         "wrong_zone", "wrong_units", "absurd", "empty", "slowloris",
         "echo_500", "echo_401", "echo_zone", "echo_value", "echo_boundary", "echo_ack",
         "echo_ack_boundary")
# Modes whose answer is a good-looking 200 with data the daemon must judge.
DATA_MODES = ("ok", "wrong_zone", "wrong_units", "absurd", "empty", "echo_zone", "echo_value")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return status, {"Content-Type": "application/json", **(headers or {})}, data


@dataclass
class Hit:
    """One request to one of the APIs, with the mode it was answered in."""

    api: str
    mode: str
    request: Request

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def received(self) -> float:
        """time.time() when the request arrived."""
        return self.request.received

    @property
    def answered(self) -> float | None:
        """When the response (or the fault) was complete; None while it is still going on."""
        return self.request.answered


@dataclass
class GridApi:
    """Three grid APIs on one FixtureServer, whose behaviour a test switches while the daemon runs.

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
        self.server = FixtureServer(routes={path: self._answer for path in API_OF_PATH}, keep_alive=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> GridApi:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def refuse(self) -> None:
        """Stop listening and drop open keep-alive connections: every request fails until reopen()."""
        self.server.refuse()

    def reopen(self) -> None:
        self.server.reopen()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base_url(self) -> str:
        return self.server.base_url

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

    def good(self, api: str, path: str, mode: str = "ok", secret: str = "") -> Response:
        """A 200 with this API's data for the current hours, shaped by a data mode."""
        if api == "electricitymaps":
            return _json(200, self.em_body(path, mode, secret))
        if api == "awattar":
            return _json(200, self.awattar_body(mode))
        return _json(200, b"<xml/>")  # ENTSO-E is only used for the echo faults

    # -- answering --------------------------------------------------------------------------------

    def _answer(self, req: Request) -> Response | Fault:
        api = API_OF_PATH[req.path]
        mode = self.modes[api]
        self.hits.append(Hit(api, mode, req))
        secret = req.headers.get("auth-token") or (req.query.get("securityToken") or [""])[0]
        target = req.target
        if mode in DATA_MODES:
            return self.good(api, req.path, mode, secret)
        if mode == "http_500":
            return _json(500, {"status": "error", "message": "Internal Server Error"})
        if mode == "http_401":
            return _json(401, {"status": "error", "message": "Unauthorized"})
        if mode == "rate_limited":
            return _json(429, {"status": "error", "message": "Too many requests"}, {"Retry-After": self.retry_after})
        if mode == "hang":
            return hang(self.hang_seconds, then=self.good(api, req.path))
        if mode == "cut":
            return cut(self.good(api, req.path), keep=1 / 3)
        if mode == "reset":
            return reset()
        if mode == "truncated_json":
            status, headers, body = self.good(api, req.path)
            data = body.encode() if isinstance(body, str) else body
            return status, headers, data[: len(data) // 2]
        if mode == "malformed":
            return _json(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>")
        if mode == "slowloris":
            return drip(self.good(api, req.path), self.drip_seconds, padding=100_000,
                        while_=lambda: self.modes[api] == "slowloris")
        if mode == "echo_500":
            return _json(500, {"message": f"internal error for key {secret}", "request": target})
        if mode == "echo_401":
            return _json(401, {"message": f"Invalid token '{secret}'", "url": target})
        if mode == "echo_boundary":
            # The key straddles character 160 of the body, where error snippets are cut.
            prefix = ('{"message": "' + "request rejected; " * 8)[:140]
            return _json(403, (prefix + secret + '"}').encode())
        if mode in ("echo_ack", "echo_ack_boundary"):
            # echo_ack_boundary: the key straddles character 200 of the text, where it is cut.
            pad = "Invalid security token "
            if mode == "echo_ack_boundary":
                pad += "." * (180 - len(pad))
            doc = ('<?xml version="1.0" encoding="utf-8"?><Acknowledgement_MarketDocument '
                   'xmlns="urn:iec62325.351:tc57wg16:451-1:acknowledgementdocument:7:0">'
                   f"<Reason><code>999</code><text>{pad}{secret}</text></Reason>"
                   "</Acknowledgement_MarketDocument>")
            return 200, {"Content-Type": "text/xml"}, doc.encode()
        raise AssertionError(f"mode {mode} not implemented")  # pragma: no cover - MODES and this list agree


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


# ---------------------------------------------------------------------------------------------------
# Slow HTTP clients: connections that hold the daemon's connection slots without finishing a request
# ---------------------------------------------------------------------------------------------------

DRIP_REQUEST_LINE = b"GET /metrics HTTP/1.1\r\n"
DRIP_HEADER = b"X-Slow: " + b"a" * 4096  # dripped one byte at a time; its line never ends


@dataclass
class HeldConnection:
    """One slow client's connection. Times are time.monotonic() (CLOCK_MONOTONIC: the same clock in every
    process on the host, so the child's times compare with the test's)."""

    kind: str  # "dripping" or "silent"
    opened: float  # connected
    closed: float | None  # the daemon closed it (EOF or reset); None: still open when the clients stopped
    answer: bytes  # what the daemon sent before closing (first 200 bytes)
    dripped: int  # bytes dripped after the request line

    @property
    def held_seconds(self) -> float | None:
        return None if self.closed is None else self.closed - self.opened


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed` (children inherit it); skip the test when
    the hard limit is lower. Slow-client tests open hundreds of sockets, more than a 1024 default allows."""
    import resource

    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _hold(kind: str, port: int, drip: tuple[float, float], reconnect: tuple[float, float] | None,
                out: list[HeldConnection], connected: Callable[[], None], stopping: Any) -> None:
    """One slow client: connect, then drip (or stay silent) until the daemon closes; reconnect if asked.

    Ends by itself once `stopping` (an asyncio.Event) is set, within a drip interval: no task cancellation,
    which asyncio.wait_for can swallow before Python 3.12."""
    import asyncio
    import random

    first = True
    while not stopping.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)
            continue
        if first:
            connected()
            first = False
        held = HeldConnection(kind, time.monotonic(), None, b"", 0)
        try:
            if kind == "dripping":
                writer.write(DRIP_REQUEST_LINE)
            while not stopping.is_set():
                wait = random.uniform(*drip) if kind == "dripping" else 1.0
                try:
                    data = await asyncio.wait_for(reader.read(4096), wait)
                except asyncio.TimeoutError:
                    if kind == "dripping":
                        writer.write(DRIP_HEADER[held.dripped % len(DRIP_HEADER):][:1])
                        held.dripped += 1
                    continue
                if not data:
                    held.closed = time.monotonic()
                    break
                held.answer = (held.answer + data)[:200]
        except OSError:
            held.closed = time.monotonic()
        finally:
            out.append(held)  # closed stays None for a connection still open at the stop
            writer.close()
        if reconnect is None:
            return
        await asyncio.sleep(random.uniform(*reconnect))


def _slow_clients_main(port: int, dripping: int, silent: int, drip: tuple[float, float],
                       reconnect: tuple[float, float] | None, stop: Any, results: Any) -> None:
    """The child process: every slow client as one asyncio task; reports "connected" once each has
    connected once, then every HeldConnection when told to stop."""
    import asyncio

    async def main() -> None:
        out: list[HeldConnection] = []
        pending = dripping + silent
        t0 = time.monotonic()
        stopping = asyncio.Event()

        def connected() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                results.put(("connected", time.monotonic() - t0))

        kinds = ["dripping"] * dripping + ["silent"] * silent
        tasks = [asyncio.create_task(_hold(kind, port, drip, reconnect, out, connected, stopping)) for kind in kinds]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        stopping.set()
        _done, late = await asyncio.wait(tasks, timeout=max(drip) + 2)
        for task in late:  # a client stuck in a connect: its record is lost, the run is not
            task.cancel()
        results.put(("done", out))

    asyncio.run(main())


class SlowClients:
    """`dripping` connections that send a request line, then one header byte every `drip` seconds and never
    finish it, and `silent` ones that send nothing, all held against the daemon from a separate process
    (so the test process's own scrapes are timed without their load). With `reconnect`, each client
    connects again that many seconds after the daemon closes it, keeping the pressure on.

    `connected_seconds` is how long it took until every client had connected once; `held` lists every
    connection once stopped."""

    def __init__(self, port: int, dripping: int = 0, silent: int = 0, drip: tuple[float, float] = (1.0, 2.0),
                 reconnect: tuple[float, float] | None = (0.5, 1.0)) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded test process
        self._stop = self._ctx.Event()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(target=_slow_clients_main, name="slow-clients", daemon=True,
                                       args=(port, dripping, silent, drip, reconnect, self._stop, self._results))
        self.connected_seconds: float | None = None
        self.held: list[HeldConnection] = []

    def __enter__(self) -> SlowClients:
        self._proc.start()
        return self

    def wait_connected(self, timeout: float) -> float:
        """Seconds from the child's start until each client had connected once."""
        kind, value = self._results.get(timeout=timeout)
        assert kind == "connected", kind
        self.connected_seconds = value
        return value

    def stop(self) -> list[HeldConnection]:
        if self._proc.is_alive() and not self._stop.is_set():
            self._stop.set()
            while True:
                kind, value = self._results.get(timeout=20)
                if kind == "done":
                    self.held = value
                    break
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
        return self.held

    def __exit__(self, *exc: object) -> None:
        self.stop()
