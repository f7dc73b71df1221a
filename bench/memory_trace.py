"""Benchmark 4b: where memory growth would come from, with tracemalloc, in-process.

RSS alone cannot tell a leak of Python objects from allocator fragmentation. This runs the same
daemon (wattson.cli.App: simulated GPUs at 10 Hz, the HTTP price source, the HTTP server) inside this
process with tracemalloc on, scrapes it ten times a second (ten times the memory run's rate, so a
per-scrape leak shows sooner), and takes `snapshots` snapshots evenly spaced after a warm-up. A leak
makes the traced total rise from snapshot to snapshot; objects alive only while a scrape or a round is
in flight make it wobble. The largest differences between the first and the last snapshot say where.
Taking a snapshot holds the GIL for a while, so the daemon may log a hung GPU read meanwhile.
"""

from __future__ import annotations

import gc
import http.client
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import free_port
from .gridfixture import daemon_config, http_price_source_available, price_api

FRAMES = 12


def _scraper(port: int, stop: threading.Event, counts: dict[str, int], hz: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    while not stop.is_set():
        try:
            conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            resp = conn.getresponse()
            resp.read()
            counts["ok" if resp.status == 200 else "failed"] += 1
        except (OSError, http.client.HTTPException):
            counts["failed"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
        stop.wait(1.0 / hz)
    conn.close()


def run(minutes: float = 5.0, warmup_seconds: float = 30.0, gpus: int = 8, hz: float = 10.0,
        scrape_hz: float = 10.0, snapshots: int = 4,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    from wattson.cli import App, apply_flags, build_parser
    from wattson.config import load_config

    use_http = http_price_source_available()
    fixture = price_api() if use_http else None
    with tempfile.TemporaryDirectory(prefix="wattson-trace-") as tmp:
        if fixture is not None:
            fixture.__enter__()
        try:
            cfg_path = Path(tmp) / "wattson.yml"
            cfg_path.write_text(daemon_config(1.0 / hz, fixture.base_url if fixture is not None else None))
            port = free_port()
            args = build_parser().parse_args([
                "--simulate.gpus", str(gpus), "--config.file", str(cfg_path),
                "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn",
                "--storage.path", str(Path(tmp) / "data")])
            tracemalloc.start(FRAMES)
            app = App(apply_flags(load_config(args.config_file), args), args)
            app.start()
            stop = threading.Event()
            counts = {"ok": 0, "failed": 0}
            scraper = threading.Thread(target=_scraper, args=(port, stop, counts, scrape_hz), daemon=True)
            scraper.start()
            try:
                time.sleep(warmup_seconds)
                seq0, ok0 = app.sampler.snapshot.seq, counts["ok"]
                taken: list[tuple[float, tracemalloc.Snapshot, int]] = []
                t0 = time.monotonic()
                for i in range(snapshots):
                    if i:
                        time.sleep(max(0.0, t0 + i * minutes * 60 / (snapshots - 1) - time.monotonic()))
                    gc.collect()
                    taken.append((time.monotonic() - t0, tracemalloc.take_snapshot(),
                                  tracemalloc.get_traced_memory()[0]))
                rounds, scrapes = app.sampler.snapshot.seq - seq0, counts["ok"] - ok0
            finally:
                stop.set()
                scraper.join(5)
                stop_error = None
                try:
                    app.stop()
                except Exception as exc:  # the measurement is taken; report a failed shutdown, keep the data
                    stop_error = f"{type(exc).__name__}: {exc}"
                tracemalloc.stop()
        finally:
            if fixture is not None:
                fixture.__exit__(None, None, None)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    first, second = taken[0][1], taken[-1][1]
    traced0, traced1 = taken[0][2], taken[-1][2]
    stats = second.filter_traces(ignore).compare_to(first.filter_traces(ignore), "traceback")
    top = []
    for st in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:5]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in st.traceback][-4:]
        top.append({"size_diff_bytes": st.size_diff, "count_diff": st.count_diff, "where": " <- ".join(
            reversed(frames))})
    out = {"minutes": minutes, "warmup_seconds": warmup_seconds, "gpus": gpus, "hz": hz,
           "scrape_hz": scrape_hz,
           "rounds": rounds, "scrapes": scrapes, "scrapes_failed": counts["failed"],
           "traced_bytes_start": traced0, "traced_bytes_end": traced1,
           "traced_growth_bytes_per_round": (traced1 - traced0) / rounds if rounds else None,
           "traced_series": [[round(t, 1), b] for t, _s, b in taken],
           "traced_monotonic_rise": all(later[2] > earlier[2]
                                        for earlier, later in zip(taken, taken[1:], strict=False)),
           "top_growth": top, "stop_error": stop_error}
    progress(f"  memory trace: Python heap {traced0 / 1024:.0f} -> {traced1 / 1024:.0f} KiB over "
             f"{rounds} rounds and {scrapes} scrapes")
    return out
