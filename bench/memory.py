"""Benchmark 4: the daemon's resident memory over a long run at 10 Hz with 8 GPUs and a scrape a second.

RSS is read from /proc/<pid>/status every `sample_every` seconds. On the second half of the run (the
first half includes allocator warm-up) two trends are fitted: least squares (with a 95% confidence
interval) and Theil-Sen (median of pairwise slopes, robust to the page- and arena-sized steps RSS
moves in). Growth is beyond noise when both say so (least-squares CI excludes zero and both
extrapolate to more than 1 MiB a day); when they disagree the run is inconclusive, and the target
is not claimed.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .common import (
    cpu_seconds,
    fit_line,
    http_get,
    open_fds,
    rss_bytes,
    sample_value,
    samples,
    theil_sen_slope,
    thread_count,
    wattson_daemon,
)
from .gridfixture import FixtureServer, daemon_config, http_price_source_available, price_api
from .loadgen import PROMETHEUS_ACCEPT

TARGET_RSS_BYTES = 60 * 1024 * 1024
MiB = 1024 * 1024


def _scraper(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """One scrape a second, gzip, on a kept-alive connection: what Prometheus does at a 1 s interval."""
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            conn.request("GET", "/metrics", headers=headers)
            resp = conn.getresponse()
            resp.read()
            counts["ok" if resp.status == 200 else "failed"] += 1
        except (OSError, http.client.HTTPException):
            counts["failed"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
        next_at += 1.0
        stop.wait(max(0.0, next_at - time.monotonic()))
    conn.close()


def _threads_fds(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process: a leak of either shows up here first."""
    return thread_count(pid), open_fds(pid)


def _fit(points: list[tuple[float, int]]) -> dict[str, Any]:
    xs = [t for t, _ in points]
    ys = [float(r) for _, r in points]
    fit = fit_line(xs, ys)
    lo, hi = fit.slope_ci95()
    robust = theil_sen_slope(xs, ys)
    ols_growth = lo > 0 and fit.slope * 86400 > MiB
    robust_growth = robust * 86400 > MiB
    return {"points": len(points), "slope_bytes_per_hour": fit.slope * 3600,
            "slope_ci95_bytes_per_hour": [lo * 3600, hi * 3600],
            "growth_bytes_per_day": fit.slope * 86400, "residual_std_bytes": fit.residual_std,
            "theil_sen_bytes_per_hour": robust * 3600, "theil_sen_growth_bytes_per_day": robust * 86400,
            "growth_significant": ols_growth and robust_growth,
            "inconclusive": ols_growth != robust_growth}


def run(minutes: float = 30.0, gpus: int = 8, hz: float = 10.0, sample_every_seconds: float = 10.0,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    duration = minutes * 60.0
    sample_every = min(sample_every_seconds, max(0.5, duration / 12))
    use_http = http_price_source_available()
    fixture_cm: AbstractContextManager[FixtureServer | None] = (
        price_api() if use_http else contextlib.nullcontext())
    with fixture_cm as fixture:
        cfg = daemon_config(1.0 / hz, fixture.base_url if fixture is not None else None)
        with wattson_daemon(cfg, gpus) as proc:
            rss0, _ = rss_bytes(proc.pid)
            cpu0 = cpu_seconds(proc.pid)
            stop = threading.Event()
            counts = {"ok": 0, "failed": 0}
            scraper = threading.Thread(target=_scraper, args=(proc.port, stop, counts), daemon=True)
            t0 = time.monotonic()
            t0_wall = time.time()
            scraper.start()
            points: list[tuple[float, int]] = [(0.0, rss0)]
            threads_fds = [_threads_fds(proc.pid)]
            next_sample = t0 + sample_every
            last_report = t0
            while True:
                now = time.monotonic()
                if now - t0 >= duration:
                    break
                time.sleep(max(0.0, min(next_sample, t0 + duration) - now))
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"wattson exited with {proc.proc.returncode} during the memory run")
                points.append((time.monotonic() - t0, rss_bytes(proc.pid)[0]))
                threads_fds.append(_threads_fds(proc.pid))
                next_sample += sample_every
                if time.monotonic() - last_report >= 300:
                    last_report = time.monotonic()
                    progress(f"  memory: {points[-1][0] / 60:.1f} min, RSS {points[-1][1] / MiB:.1f} MiB")
            stop.set()
            scraper.join(10)
            elapsed = time.monotonic() - t0
            rss_end, hwm = rss_bytes(proc.pid)
            cpu = cpu_seconds(proc.pid) - cpu0
            seq_text = http_get(proc.port, "/metrics")[2].decode()
            fetches = ([round(r.received - t0_wall, 2) for r in fixture.requests if r.received >= t0_wall - 60]
                       if fixture is not None else [])
    half = [p for p in points if p[0] >= elapsed / 2]
    out: dict[str, Any] = {
        "minutes": elapsed / 60, "gpus": gpus, "hz": hz, "sample_every_seconds": sample_every,
        "scrapes_ok": counts["ok"], "scrapes_failed": counts["failed"],
        "rss_after_start_bytes": rss0, "rss_end_bytes": rss_end, "rss_peak_bytes": hwm,
        "rss_max_sampled_bytes": max(r for _, r in points),
        "daemon_cpu_core_share": cpu / elapsed if elapsed > 0 else None,
        "fit_all": _fit(points), "fit_second_half": _fit(half),
        "samples": [[round(t, 1), r] for t, r in points],
        "grid": "octopus HTTP price source (local fixture) + static" if use_http else "static sources",
        "price_api_fetch_seconds": fetches,
        "threads_min_max": [min(t for t, _ in threads_fds), max(t for t, _ in threads_fds)],
        "fds_min_max": [min(f for _, f in threads_fds), max(f for _, f in threads_fds)],
        "http_source_up_at_end": (sample_value(seq_text, "wattson_source_up", source="octopus") == 1
                                  if use_http else None),
        "series_at_end": len(samples(seq_text)),
    }
    half_fit = out["fit_second_half"]
    out["target_met"] = (hwm < TARGET_RSS_BYTES and not half_fit["growth_significant"]
                         and not half_fit["inconclusive"])
    progress(f"  memory: RSS {rss0 / MiB:.1f} MiB at start, {rss_end / MiB:.1f} MiB after {elapsed / 60:.1f} "
             "min "
             f"(peak {hwm / MiB:.1f} MiB), second-half slope "
             f"{out['fit_second_half']['slope_bytes_per_hour'] / 1024:.1f} KiB/h")
    return out
