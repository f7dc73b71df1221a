"""Benchmark 1: latency of GET /metrics, wattson (8 and 64 simulated GPUs, grid on) vs node_exporter.

Each target runs alone (the others are stopped) so they never compete for the CPU; all get the same
closed-loop client (bench.loadgen), the same Prometheus request headers and the same request count.
The target is a ratio, wattson p99 / node_exporter p99, measured in the same run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .common import (
    Process,
    WaitTimeout,
    cpu_seconds,
    http_get,
    node_exporter,
    node_exporter_binary,
    rss_bytes,
    sample_value,
    samples,
    shipped_handler_disables_nagle,
    wait_for,
    wattson_daemon,
)
from .gridfixture import FixtureServer, daemon_config, http_price_source_available, price_api
from .loadgen import PROMETHEUS_ACCEPT, run_load

ENCODINGS: dict[str, dict[str, str]] = {
    "gzip": {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"},  # what Prometheus sends
    "identity": {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "identity"},
}


def series_count(text: str) -> int:
    return len(samples(text))


def _exposition(port: int) -> tuple[int, int]:
    """(series, plain bytes) of one text-format scrape."""
    status, _h, body = http_get(port, "/metrics", headers={"Accept": "text/plain;version=0.0.4"})
    if status != 200:
        raise RuntimeError(f"GET /metrics on port {port}: HTTP {status}")
    return series_count(body.decode()), len(body)


def _wait_source_up(port: int, source: str, timeout_seconds: float = 15.0) -> bool:
    """Whether wattson_source_up{source} became 1 within the timeout (reported, not required)."""
    def up() -> bool:
        return sample_value(http_get(port, "/metrics")[2].decode(), "wattson_source_up", source=source) == 1

    try:
        return wait_for(f"source {source} up", up, timeout_seconds, interval=0.2)
    except WaitTimeout:
        return False


def _measure_target(proc: Process, requests: int, concurrencies: tuple[int, ...], encodings: tuple[str, ...],
                    warmup: int, progress: Callable[[str], None]) -> dict[str, Any]:
    cpu0 = cpu_seconds(proc.pid)
    runs: dict[str, dict[str, Any]] = {}
    for enc in encodings:
        for conc in concurrencies:
            res = run_load(proc.port, "/metrics", requests, conc, ENCODINGS[enc], warmup)
            runs[f"{enc}/c{conc}"] = res.summary()
            s = runs[f"{enc}/c{conc}"]
            progress(f"  {proc.name} {enc} c={conc}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
                     f"{s['throughput_rps']:.0f} req/s, errors {s['errors']}")
    rss, hwm = rss_bytes(proc.pid)
    served = len(encodings) * sum(requests + warmup * conc for conc in concurrencies)
    cpu = cpu_seconds(proc.pid) - cpu0
    series, plain_bytes = _exposition(proc.port)  # steady state: every counter has had its first step
    return {"series": series, "plain_bytes": plain_bytes, "runs": runs, "rss_bytes_after": rss,
            "rss_peak_bytes": hwm, "server_cpu_seconds": cpu,
            "server_cpu_ms_per_request": cpu / served * 1000}


def run(requests: int = 2000, concurrencies: tuple[int, ...] = (1, 16), gpu_counts: tuple[int, ...] = (8, 64),
        encodings: tuple[str, ...] = ("gzip", "identity"), warmup: int = 20,
        with_nodelay_variant: bool = True, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every target; `with_nodelay_variant` adds the daemon with TCP_NODELAY switched on by the
    bench (what the proposed web.py change does), unless the shipped handler already sets it."""
    use_http = http_price_source_available()
    out: dict[str, Any] = {
        "requests": requests, "concurrencies": list(concurrencies), "encodings": list(encodings),
        "gpu_counts": list(gpu_counts), "sampler_interval_seconds": 1.0, "warmup_per_scraper": warmup,
        "grid": ("carbon: static; price: octopus HTTP source against a local fixture server, static fallback"
                 if use_http else
                 "carbon: static; price: static (no HTTP price source registered in this build)"),
        "shipped_nodelay": shipped_handler_disables_nagle(),
        "targets": {},
    }
    fixture_cm: AbstractContextManager[FixtureServer | None] = (
        price_api() if use_http else contextlib.nullcontext())
    with fixture_cm as fixture:
        targets: list[tuple[str, Callable[[], AbstractContextManager[Process]]]] = []
        if node_exporter_binary() is not None:
            targets.append(("node_exporter", node_exporter))
        else:
            out["targets"]["node_exporter"] = {"error": "prometheus-node-exporter not installed"}
            progress("  node_exporter not installed: reference skipped")
        cfg = daemon_config(1.0, fixture.base_url if fixture is not None else None)
        for n in gpu_counts:
            targets.append((f"wattson_{n}gpu", functools.partial(wattson_daemon, cfg, n)))
        if with_nodelay_variant and not out["shipped_nodelay"]:
            for n in gpu_counts:
                targets.append((f"wattson_{n}gpu_nodelay",
                                functools.partial(wattson_daemon, cfg, n, patch_nodelay=True)))
        for name, factory in targets:
            with factory() as proc:
                extra: dict[str, Any] = {}
                if name.startswith("wattson") and fixture is not None:
                    extra["http_source_up"] = _wait_source_up(proc.port, "octopus")
                    extra["fixture_requests"] = len(fixture.requests)
                out["targets"][name] = {**_measure_target(proc, requests, concurrencies, encodings, warmup,
                                                          progress), **extra}
    out["ratios"] = ratios(out)
    return out


def ratios(out: dict[str, Any]) -> list[dict[str, Any]]:
    """wattson / node_exporter for p50 and p99, per variant, GPU count, encoding and concurrency."""
    ref = out["targets"].get("node_exporter", {}).get("runs")
    rows = []
    variants = [("", "as shipped"), ("_nodelay", "with TCP_NODELAY (proposed fix)")]
    for (suffix, variant), n in itertools.product(variants, out["gpu_counts"]):
        for key, s in out["targets"].get(f"wattson_{n}gpu{suffix}", {}).get("runs", {}).items():
            r = ref.get(key) if ref else None
            rows.append({
                "variant": variant, "gpus": n, "run": key,
                "wattson_p50_ms": s["p50_ms"], "wattson_p99_ms": s["p99_ms"],
                "node_p50_ms": r["p50_ms"] if r else None, "node_p99_ms": r["p99_ms"] if r else None,
                "p50_ratio": s["p50_ms"] / r["p50_ms"] if r else None,
                "p99_ratio": s["p99_ms"] / r["p99_ms"] if r else None,
            })
    return rows
