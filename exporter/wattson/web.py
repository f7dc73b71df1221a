"""HTTP exposition: /metrics, a landing page, /healthz and /readyz, optionally behind TLS and basic auth.

TLS is set up per connection, in the connection's own thread, with the context the web config's
TlsContextSource holds at that moment, so a certificate rotated on disk serves new connections.

Slow or stalled clients must never starve real scrapers, so every connection lives against deadlines
rather than per-read timeouts (a client dripping one byte at a time would reset those forever):

- the TLS handshake, the request line and all headers must arrive within REQUEST_DEADLINE_SECONDS of
  the connection being accepted (or of the previous response on a kept-alive connection); each read
  waits only for what is left of that deadline, then the connection is closed;
- writing a response has its own deadline, RESPONSE_TIMEOUT_SECONDS, for the whole response.

Each connection gets its own thread; at most MAX_CONCURRENT_CONNECTIONS hold a slot. When a new
connection finds every slot taken, the accept loop closes the connection that has waited longest for
a complete request (silent or half-sent; never one being answered) and hands its slot to the newcomer;
if every slot is answering a request, the newcomer gets a 503 at once. The accept loop never waits
for anything, so it keeps accepting, and shutdown() returns within one poll interval.
"""

from __future__ import annotations

import html
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .exposition import Exposition
from .logfmt import kv
from .snapshot import Snapshot
from .webconfig import WebSecurity

log = logging.getLogger("wattson.web")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# TLS handshake + request line + headers, from accept (or from the previous response when kept alive).
REQUEST_DEADLINE_SECONDS = 5.0
# Writing one whole response: a client that stops reading gives its slot back after this.
RESPONSE_TIMEOUT_SECONDS = 10.0
MAX_CONCURRENT_CONNECTIONS = 256
_SEND_CHUNK = 64 * 1024
_SERVICE_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\nConnection: close\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\n\r\ntoo many connections")


class _Connection:
    """One accepted connection: its socket (the TLS one once wrapped) and the deadline of its current phase.

    `waiting` is True while it waits for a complete request (evictable), False while it is answered.
    Only the connection's own thread changes `deadline` and `waiting`; `sock` is swapped under the server
    lock so that an eviction always reaches the socket in use."""

    __slots__ = ("sock", "deadline", "waiting")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.waiting = True

    def remaining(self) -> float:
        """Seconds left of the current deadline; TimeoutError once it has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connection deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """Socket reads against the connection's deadline: each read waits only for what is left of it, so
    bytes dripping in cannot stretch the time a connection may take to send its request."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        sock = self._conn.sock
        sock.settimeout(self._conn.remaining())
        return sock.recv_into(buffer)


class _DeadlineWriter(io.BufferedIOBase):
    """Unbuffered socket writes against the response deadline (the first write also ends the connection's
    wait for a request: an error answer to a bad request is an answer too)."""

    def __init__(self, server: WattsonHTTPServer, conn: _Connection) -> None:
        self._server = server
        self._conn = conn

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._conn.waiting:
            self._server.answering(self._conn)
        sock = self._conn.sock
        with memoryview(data) as view, view.cast("B") as octets:
            sent = 0
            while sent < len(octets):
                sock.settimeout(self._conn.remaining())  # one deadline for all of it, not one per send
                sent += sock.send(octets[sent:sent + _SEND_CHUNK])
            return sent


API_CONTENT_TYPE = "application/json"
# An API endpoint: (query parameters, If-None-Match) -> (status, extra headers, JSON body). It reads immutable
# state only, like a scrape.
ApiHandler = Callable[[Mapping[str, list[str]], str | None], tuple[int, dict[str, str], bytes]]


class WattsonHTTPServer(ThreadingHTTPServer):
    """One thread per connection, bounded slots that the longest-waiting connection gives up first, and
    deadlines on every connection (module docstring): no client can hold the server, however slow."""

    daemon_threads = True
    # Bursts of connections (a scrape storm, slow clients reconnecting) wait in the kernel rather than be
    # dropped and retried by the client a second later; the accept loop works through them without waiting.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], Snapshot],
                 security: WebSecurity | None = None,
                 healthy: Callable[[], bool] = lambda: True,
                 api: Mapping[str, ApiHandler] | None = None) -> None:
        self.snapshot = snapshot
        self.exposition = Exposition()
        self.security = security or WebSecurity()
        self.healthy = healthy
        self.api = dict(api or {})
        self.max_connections = MAX_CONCURRENT_CONNECTIONS
        self._lock = threading.Lock()
        self._held: set[_Connection] = set()  # connections holding a slot
        # Those of them waiting for a complete request, longest-waiting first (insertion order).
        self._waiting: dict[_Connection, None] = {}
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    # -- slots ------------------------------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> _Connection | None:
        """A slot for a new connection, evicting the longest-waiting one if none is free; None if all answer."""
        with self._lock:
            if len(self._held) >= self.max_connections:
                victim = next(iter(self._waiting), None)
                if victim is None:
                    return None
                self._drop(victim)
                log.debug("connection evicted: every slot taken, it had not sent a complete request")
            conn = _Connection(sock, time.monotonic() + REQUEST_DEADLINE_SECONDS)
            self._held.add(conn)
            self._waiting[conn] = None
            return conn

    def _drop(self, conn: _Connection) -> None:
        """Take a connection's slot away and shut its socket, so its thread sees EOF and ends. Lock held:
        the owning thread releases its slot under the lock before it closes the socket, so this never
        touches a closed (or reused) descriptor."""
        self._held.discard(conn)
        self._waiting.pop(conn, None)
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)  # the TCP socket, also under TLS
        except OSError:
            pass

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            self._held.discard(conn)
            self._waiting.pop(conn, None)

    def await_request(self, conn: _Connection) -> None:
        """A kept-alive connection starts waiting for its next request: a fresh deadline, evictable again."""
        with self._lock:
            conn.waiting = True
            conn.deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
            if conn in self._held:
                self._waiting.pop(conn, None)
                self._waiting[conn] = None  # now the newest waiter

    def answering(self, conn: _Connection) -> None:
        """A complete request arrived (or an error answer starts): not evictable, response deadline on."""
        with self._lock:
            conn.waiting = False
            conn.deadline = time.monotonic() + RESPONSE_TIMEOUT_SECONDS
            self._waiting.pop(conn, None)

    # -- the accept loop's hand-off ---------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to its own thread. Never waits: this runs in the accept loop, which also
        answers shutdown()."""
        conn = self._admit(request)
        if conn is None:
            self._refuse(request)
            return
        thread = threading.Thread(target=self._serve, args=(conn, client_address), name="http-conn",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: drop this one rather than the loop
            self._release(conn)
            self.shutdown_request(request)

    def _refuse(self, sock: socket.socket) -> None:
        """Every slot is answering a request: a 503 on plain HTTP (a TLS port cannot answer without a
        handshake, which would make the accept loop wait), then close; never blocks."""
        try:
            sock.setblocking(False)
            if self.security.tls is None:
                sock.send(_SERVICE_UNAVAILABLE)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(65536)  # a request already received, left unread, would make close() reset the 503
        except OSError:
            pass
        self.shutdown_request(sock)

    def _serve(self, conn: _Connection, client_address: Any) -> None:
        try:
            if self._start_tls(conn, client_address):
                _Handler(conn, client_address, self)
        except Exception:
            self.handle_error(conn.sock, client_address)
        finally:
            self._release(conn)  # before the close: see _drop
            self.shutdown_request(conn.sock)

    def _start_tls(self, conn: _Connection, client_address: Any) -> bool:
        """The TLS handshake, in this connection's thread and inside its request deadline; False if it failed."""
        tls = self.security.tls
        if tls is None:
            return True
        try:
            # get() per connection: rotated certificate files serve from the next handshake on
            context = tls.get()
            with self._lock:
                conn.sock = tls_sock = context.wrap_socket(conn.sock, server_side=True,
                                                           do_handshake_on_connect=False)
            tls_sock.settimeout(conn.remaining())  # one deadline for the whole handshake
            tls_sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # TimeoutError is an OSError
            log.debug("TLS handshake failed", extra=kv(client=client_address[0], err=exc))
            return False
        return True

    def server_close(self) -> None:
        """Stop listening and close every connection still waiting for a request (those being answered
        finish their response)."""
        super().server_close()
        with self._lock:
            for conn in list(self._waiting):
                self._drop(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error", extra=kv(client=client_address[0]))

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: WattsonHTTPServer
    server_version = f"wattson/{__version__}"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two sends; with Nagle on, a kept-alive scrape would wait for the
    # client's delayed ACK before the body leaves.
    disable_nagle_algorithm = True

    def __init__(self, conn: _Connection, client_address: Any, server: WattsonHTTPServer) -> None:
        self.conn = conn
        self._requests = 0
        super().__init__(conn.sock, client_address, server)

    def setup(self) -> None:
        # StreamRequestHandler.setup, with reads and writes that keep the connection's deadlines.
        self.connection = self.request
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = io.BufferedReader(_DeadlineReader(self.conn))
        self.wfile = _DeadlineWriter(self.server, self.conn)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs would be one line per scrape; errors are logged where they happen

    def handle_one_request(self) -> None:
        if self._requests:
            self.server.await_request(self.conn)  # kept alive: the next request has its own deadline
        self._requests += 1
        super().handle_one_request()

    def parse_request(self) -> bool:
        complete = super().parse_request()
        if complete and self.conn.waiting:
            self.server.answering(self.conn)
        return complete

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
        elif path in self.server.api:
            query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
            status, headers, body = self.server.api[path](query, self.headers.get("If-None-Match"))
            self._send(status, b"" if status == 304 else body, API_CONTENT_TYPE, headers, head)
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
