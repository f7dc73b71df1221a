"""A small closed-loop HTTP load client: one process per concurrent scraper, one persistent connection each.

Processes, not threads: with threads the client's own GIL hand-offs (5 ms switch interval) would show
up in the latency tail and blur the comparison. Every target gets exactly the same client, headers
and request count, so only the server differs.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .common import percentile

# What Prometheus 2.x sends on a scrape (text and OpenMetrics accepted, gzip on).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@dataclass(frozen=True)
class LoadResult:
    requests: int
    concurrency: int
    errors: int
    wall_seconds: float
    latencies_seconds: tuple[float, ...]  # sorted
    response_bytes: int  # body size of the last response (as sent, i.e. compressed when gzip)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_seconds
        ms = 1000.0
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "errors": self.errors,
            "throughput_rps": len(lat) / self.wall_seconds if self.wall_seconds > 0 else 0.0,
            "mean_ms": sum(lat) / len(lat) * ms if lat else None,
            "p50_ms": percentile(lat, 50) * ms,
            "p90_ms": percentile(lat, 90) * ms,
            "p99_ms": percentile(lat, 99) * ms,
            "p999_ms": percentile(lat, 99.9) * ms,
            "max_ms": lat[-1] * ms if lat else None,
            "response_bytes": self.response_bytes,
        }


def _worker(port: int, path: str, headers: dict[str, str], count: int, warmup: int,
            start: Any, out: Connection) -> None:
    """Runs in a child process: warm up, wait for the common start, then `count` timed requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = array("d")
    errors = 0
    size = 0

    def one() -> bool:
        nonlocal conn, size
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            size = len(body)
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            return False

    for _ in range(warmup):
        one()
    start.wait()
    clock = time.perf_counter
    for _ in range(count):
        t0 = clock()
        ok = one()
        t1 = clock()
        if ok:
            latencies.append(t1 - t0)
        else:
            errors += 1
    conn.close()
    out.send((latencies.tobytes(), errors, size))
    out.close()


def run_load(port: int, path: str = "/metrics", total_requests: int = 2000, concurrency: int = 1,
             headers: dict[str, str] | None = None, warmup_per_worker: int = 20) -> LoadResult:
    """`total_requests` split evenly over `concurrency` closed-loop workers started together."""
    ctx = mp.get_context("fork")
    start = ctx.Barrier(concurrency + 1)
    per_worker = [total_requests // concurrency + (1 if i < total_requests % concurrency else 0)
                  for i in range(concurrency)]
    pipes: list[Connection] = []
    procs = []
    for count in per_worker:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(port, path, dict(headers or {}), count, warmup_per_worker,
                                              start, send), daemon=True)
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    start.wait()
    t0 = time.perf_counter()
    latencies = array("d")
    errors = 0
    size = 0
    for recv in pipes:
        raw, err, sz = recv.recv()
        chunk = array("d")
        chunk.frombytes(raw)
        latencies.extend(chunk)
        errors += err
        size = max(size, sz)
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(10)
    return LoadResult(total_requests, concurrency, errors, wall, tuple(sorted(latencies)), size)
