"""HTTP exposition: /metrics, a landing page, /healthz and /readyz, optionally behind TLS and basic auth.

TLS is set up per connection, in the connection's own thread, with the context the web config's
TlsContextSource holds at that moment, so a certificate rotated on disk serves new connections.

Each connection gets its own thread with a socket timeout, so a slow or stalled client (or a slow
TLS handshake) only ever holds its own thread; a semaphore bounds how many run at once. When every
slot is taken, the connection that has waited longest without sending a request is closed to make
room, so silent clients can neither starve real scrapers nor block the accept loop (and shutdown).
"""

from __future__ import annotations

import html
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .exposition import Exposition
from .logfmt import kv
from .snapshot import Snapshot
from .webconfig import WebSecurity

log = logging.getLogger("wattson.web")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_TIMEOUT_SECONDS = 10.0
MAX_CONCURRENT_CONNECTIONS = 256


class WattsonHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], Snapshot],
                 security: WebSecurity | None = None,
                 healthy: Callable[[], bool] = lambda: True) -> None:
        self.snapshot = snapshot
        self.exposition = Exposition()
        self.security = security or WebSecurity()
        self.healthy = healthy
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_CONNECTIONS)
        self._idle: dict[Any, float] = {}  # connection -> since when it waits for a request line
        self._idle_lock = threading.Lock()
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def mark_idle(self, conn: Any, idle: bool) -> None:
        with self._idle_lock:
            if idle:
                self._idle[conn] = time.monotonic()
            else:
                self._idle.pop(conn, None)

    def _evict_idlest(self) -> None:
        with self._idle_lock:
            if not self._idle:
                return
            conn = min(self._idle, key=self._idle.__getitem__)
            del self._idle[conn]
        try:
            conn.shutdown(socket.SHUT_RDWR)  # its thread sees EOF, ends and frees its slot
        except OSError:
            pass

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded concurrency without ever blocking the accept loop for long.
        if not self._slots.acquire(blocking=False):
            self._evict_idlest()
            if not self._slots.acquire(timeout=1.0):
                try:
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(CLIENT_TIMEOUT_SECONDS)
            self.mark_idle(request, True)  # a silent client can be evicted even before its TLS handshake
            tls = self.security.tls
            if tls is not None:
                raw = request
                try:
                    # get() per connection: rotated certificate files serve from the next handshake on
                    request = tls.get().wrap_socket(raw, server_side=True)  # handshake in this thread
                except (ssl.SSLError, OSError) as exc:
                    log.debug("TLS handshake failed", extra=kv(client=client_address[0], err=exc))
                    self.shutdown_request(raw)
                    return
                finally:
                    self.mark_idle(raw, False)
                self.mark_idle(request, True)
            super().process_request_thread(request, client_address)
        finally:
            self.mark_idle(request, False)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error", extra=kv(client=client_address[0]))

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: WattsonHTTPServer
    server_version = f"wattson/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_SECONDS
    # Headers and body go out in two sends; with Nagle on, a kept-alive scrape would wait for the
    # client's delayed ACK before the body leaves.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs would be one line per scrape; errors are logged where they happen

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.server.security.headers, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorised(self) -> bool:
        sec = self.server.security
        if not sec.auth_required() or sec.check_basic_auth(self.headers.get("Authorization")):
            return True
        self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                   {"WWW-Authenticate": 'Basic realm="wattson"'})
        return False

    def handle_one_request(self) -> None:
        self.server.mark_idle(self.connection, True)  # waiting for the (next) request line
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.server.mark_idle(self.connection, False)  # a request line arrived: it is being served
        return super().parse_request()

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        if not self._authorised():
            return
        path = self.path.split("?", 1)[0]
        snap = self.server.snapshot()
        if path == "/metrics":
            rendered = self.server.exposition.render(snap)
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                self._send(200, rendered.gzipped, CONTENT_TYPE, {"Content-Encoding": "gzip"}, head)
            else:
                self._send(200, rendered.text, CONTENT_TYPE, None, head)
        elif path == "/healthz":
            ok = self.server.healthy()
            self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain; charset=utf-8",
                       None, head)
        elif path == "/readyz":
            ready = snap.ready
            self._send(200 if ready else 503, b"ready\n" if ready else b"not ready: no sample yet\n",
                       "text/plain; charset=utf-8", None, head)
        elif path == "/":
            self._send(200, landing_page(snap).encode(), "text/html; charset=utf-8", None, head)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", None, head)


def landing_page(snap: Snapshot) -> str:
    """A small page for humans: what this is, what it sees, where the metrics are. No config, no keys."""
    rows = "".join(
        f"<tr><td>{g.identity.index}</td><td>{html.escape(g.identity.name)}</td>"
        f"<td><code>{html.escape(g.identity.uuid)}</code></td><td>{'up' if g.up else 'down'}</td>"
        f"<td>{g.reading.power_watts if g.reading and g.up else '-'}</td>"
        f"<td>{g.energy_joules / 3.6e6:.4f}</td></tr>"
        for g in snap.gpus)
    signals = "".join(
        f"<li>{html.escape(s.signal)} ({html.escape(s.zone)}): "
        + (f"{s.value:g} {html.escape(s.currency or 'gCO2e')}/kWh from {html.escape(s.source or '')}"
           if s.value is not None else "unknown")
        + "</li>"
        for s in snap.signals)
    banner = ("<p><strong>Simulated GPUs</strong>: these numbers come from wattson's simulator, "
              "not from hardware.</p>" if snap.backend == "simulated" else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wattson</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .8em}}</style></head>
<body><h1>wattson {html.escape(__version__)}</h1>
<p>Electricity meter for GPUs: power, energy, cost and CO2e as Prometheus metrics.</p>
{banner}
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot; <a href="/readyz">/readyz</a></p>
<h2>GPUs ({html.escape(snap.backend or 'starting')})</h2>
<table><tr><th>gpu</th><th>name</th><th>uuid</th><th>state</th><th>power W</th><th>energy kWh</th></tr>{rows}</table>
<h2>Grid signals</h2><ul>{signals or '<li>none configured</li>'}</ul>
</body></html>
"""
