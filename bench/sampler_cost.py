"""Benchmark 2: what sampling costs wattson itself, NVML excluded.

The GPUs are fakes whose read() costs nothing beyond building the reading ("free"), or that also
sleep 1 ms inside read() like a slow driver call ("1 ms"), so the CPU measured is wattson's own:
the reader-thread hand-off, energy accounting, pricing, snapshots. Measured in this process with
time.process_time() (all threads) around N sample_round() calls, and around the real sampler loop
(Sampler.start()) at 1 Hz and 10 Hz, with the grid (static sources) and budgets configured.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from wattson.gpu.base import GpuIdentity, GpuReading
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import StaticSource
from wattson.sampler import Sampler
from wattson.snapshot import Budgets

from .common import http_get, sample_value, thread_count, wattson_daemon
from .gridfixture import daemon_config

TARGET_CORE_SHARE = 0.005  # at most 0.5% of one core at 10 Hz with 8 GPUs (free reads)
SCALE_GPUS = 1024
TARGET_SCALE_THREADS = 20  # threads of the whole process while sampling 1,024 GPUs
TARGET_SCALE_ROUND_SECONDS = 0.100


class FakeGpu:
    """A GPU whose driver calls cost nothing: read() only builds the reading (counter = 400 W exactly)."""

    def __init__(self, index: int, read_delay_seconds: float = 0.0) -> None:
        self.identity = GpuIdentity(index, f"GPU-bench-{index:04d}-0000-0000-000000000000", "Bench GPU",
                                    f"00000000:{index:02X}:00.0", "bench")
        self.delay = read_delay_seconds
        self._origin = time.monotonic()

    def read(self) -> GpuReading:
        if self.delay:
            time.sleep(self.delay)
        mono = time.monotonic()
        return GpuReading(time.time(), mono, 400.0, int((mono - self._origin) * 400_000.0), 700.0,
                          40 * 2**30, 80 * 2**30, 0.9)


class FakeBackend:
    name = "fake"
    simulated = True
    counter_epoch = "bench"

    def __init__(self, gpus: int, read_delay_seconds: float) -> None:
        self.devices = [FakeGpu(i, read_delay_seconds) for i in range(gpus)]

    def start(self) -> list[FakeGpu]:
        return list(self.devices)

    def restart(self) -> list[FakeGpu]:
        return list(self.devices)

    def close(self) -> None:
        pass


def grid() -> GridSignals:
    """Static carbon and price chains, fetched once (no polling threads: they would only add noise)."""
    carbon = SignalChain("carbon", "DE", 7200.0, [StaticSource("carbon", "DE", 380.0, None)])
    price = SignalChain("price", "DE", 7200.0, [StaticSource("price", "DE", 0.30, "EUR")])
    carbon.poll_due()
    price.poll_due()
    return GridSignals(pue=1.2, carbon=carbon, price=price)


BUDGETS = Budgets("EUR", (("day", 50.0), ("month", 1500.0)), (("day", 2e5),), 300.0)


def make_sampler(gpus: int, read_delay_seconds: float, interval_seconds: float = 1.0) -> Sampler:
    sampler = Sampler(FakeBackend(gpus, read_delay_seconds), interval_seconds=interval_seconds, grid=grid(),
                      budgets=BUDGETS)
    sampler.start_backend()
    return sampler


def _rusage() -> tuple[float, int, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw, ru.ru_nivcsw


def per_round(gpus: int, read_delay_seconds: float, rounds: int, warmup: int = 50,
              batches: int = 5) -> dict[str, Any]:
    """CPU per sample_round(), called back to back, in `batches` batches (median and min reported:
    other processes on the machine inflate single batches)."""
    sampler = make_sampler(gpus, read_delay_seconds)
    per_batch = max(1, rounds // batches)
    cpu_per_round: list[float] = []
    try:
        for _ in range(warmup):
            sampler.sample_round()
        ru0 = _rusage()
        wall0 = time.perf_counter()
        for _ in range(batches):
            c0 = time.process_time()
            for _ in range(per_batch):
                sampler.sample_round()
            cpu_per_round.append((time.process_time() - c0) / per_batch)
        wall = time.perf_counter() - wall0
        ru1 = _rusage()
    finally:
        sampler.stop()
    total_rounds = per_batch * batches
    per = statistics.median(cpu_per_round)
    return {
        "rounds": total_rounds, "batches": batches,
        "cpu_seconds_per_round": per, "cpu_seconds_per_round_min": min(cpu_per_round),
        "cpu_seconds_per_round_batches": cpu_per_round,
        "cpu_seconds_per_gpu_read": per / gpus,
        "wall_seconds_per_round": wall / total_rounds,
        "rusage_cpu_seconds_per_round": (ru1[0] - ru0[0]) / total_rounds,
        "context_switches_per_round": ((ru1[1] - ru0[1]) + (ru1[2] - ru0[2])) / total_rounds,
        "core_share_at_1hz": per * 1.0, "core_share_at_10hz": per * 10.0,
    }


def loop(gpus: int, read_delay_seconds: float, hz: float, seconds: float, windows: int = 3) -> dict[str, Any]:
    """The real sampler loop (its own thread, on its own schedule) for `seconds`, process CPU delta
    over the whole run and over `windows` equal windows (median reported next to the mean)."""
    sampler = make_sampler(gpus, read_delay_seconds, 1.0 / hz)
    shares: list[float] = []
    try:
        # Baseline: the same process with the sampler parked, over a short window.
        idle_window = min(2.0, seconds / 5)
        c0 = time.process_time()
        time.sleep(idle_window)
        idle_share = (time.process_time() - c0) / idle_window
        seq0 = sampler.snapshot.seq
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sampler.start()
        for _ in range(windows):
            c, w = time.process_time(), time.perf_counter()
            time.sleep(seconds / windows)
            shares.append((time.process_time() - c) / (time.perf_counter() - w))
        sampler._stop.set()  # stop scheduling rounds before reading the clocks
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        rounds = sampler.snapshot.seq - seq0
    finally:
        sampler.stop()
    return {
        "hz": hz, "seconds": wall, "rounds": rounds, "cpu_seconds": cpu,
        "core_share": cpu / wall, "core_share_windows": shares,
        "core_share_median_window": statistics.median(shares),
        "idle_core_share": idle_share,
        "cpu_seconds_per_round": cpu / rounds if rounds else None,
    }


def hotspots(gpus: int, rounds: int, top: int = 12) -> dict[str, Any]:
    """cProfile of one round's work done inline on this thread (cProfile sees one thread only): every
    GPU's read and accounting plus the snapshot publish. The rest of a real round's CPU is the hand-off
    to the reader thread, reported as the difference between the threaded and the inline cost."""
    sampler = make_sampler(gpus, 0.0)
    try:
        def inline_round() -> None:
            rnd = sampler._begin()
            for g in rnd.gpus:
                g.record(g.read(), rnd.tariff, rnd.workloads)
            sampler._finish(rnd)

        for _ in range(50):
            inline_round()
        c0 = time.process_time()
        for _ in range(rounds):
            inline_round()
        inline_cpu = (time.process_time() - c0) / rounds
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(rounds):
            inline_round()
        prof.disable()
    finally:
        sampler.stop()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
            stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:  # type: ignore[attr-defined]
        if filename == "<string>":
            where = "(generated dataclass code)"
        elif "/exporter/" in filename:
            where = filename.split("/exporter/")[-1]
        else:
            where = filename.rsplit("/", 1)[-1]
        rows.append({"function": f"{where}:{line}({func})", "calls_per_round": ncalls / rounds,
                     "tottime_share": tottime / total if total else 0.0,
                     "cumtime_us_per_round": cumtime / rounds * 1e6})
    return {"inline_cpu_seconds_per_round": inline_cpu, "rows": rows}


def scale(gpus: int = SCALE_GPUS, seconds: float = 20.0, hz: float = 1.0) -> dict[str, Any]:
    """The real daemon (`wattson --simulate.gpus N`, grid and budgets configured) for `seconds`: threads of
    the process as the kernel counts them, and each round's wall time from its own duration gauge."""
    durations: list[float] = []
    threads: list[int] = []
    with wattson_daemon(daemon_config(1.0 / hz, None), gpus) as d:
        last_ts = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.25)
            threads.append(thread_count(d.pid))
            status, _headers, body = http_get(d.port, "/metrics")
            if status != 200:
                continue
            text = body.decode()
            ts = sample_value(text, "wattson_last_sample_timestamp_seconds")
            duration = sample_value(text, "wattson_sampler_duration_seconds")
            if ts is not None and ts != last_ts and duration is not None:
                last_ts = ts
                durations.append(duration)
    durations = sorted(durations[1:] or durations)  # the first round only takes baselines
    return {
        "gpus": gpus, "hz": hz, "seconds": seconds, "rounds": len(durations),
        "threads_peak": max(threads), "threads_median": statistics.median(threads),
        "round_seconds_median": statistics.median(durations) if durations else None,
        "round_seconds_max": durations[-1] if durations else None,
        "target_threads": TARGET_SCALE_THREADS, "target_round_seconds": TARGET_SCALE_ROUND_SECONDS,
        "target_met": bool(durations) and max(threads) <= TARGET_SCALE_THREADS
        and durations[-1] < TARGET_SCALE_ROUND_SECONDS,
    }


def run(gpus: int = 8, rounds: int = 5000, loop_seconds: float = 30.0, scale_gpus: int = SCALE_GPUS,
        scale_seconds: float = 20.0, progress: Callable[[str], None] = print) -> dict[str, Any]:
    out: dict[str, Any] = {"gpus": gpus, "target_core_share_at_10hz": TARGET_CORE_SHARE, "backends": {},
                           "python_threads_at_start": threading.active_count()}
    for label, delay in (("free", 0.0), ("1ms", 0.001)):
        r = per_round(gpus, delay, rounds)
        progress(f"  {label}: {r['cpu_seconds_per_round'] * 1e6:.0f} us CPU per round "
                 f"-> {r['core_share_at_10hz'] * 100:.2f}% of a core at 10 Hz")
        loops = {}
        for hz in (1.0, 10.0):
            lr = loop(gpus, delay, hz, loop_seconds)
            loops[f"{hz:g}hz"] = lr
            progress(f"  {label} loop {hz:g} Hz for {lr['seconds']:.0f} s: "
                     f"{lr['core_share'] * 100:.3f}% of a core")
        out["backends"][label] = {"read_delay_seconds": delay, "per_round": r, "loop": loops}
    out["hotspots"] = hotspots(gpus, max(200, rounds // 5))
    threaded = out["backends"]["free"]["per_round"]["cpu_seconds_per_round"]
    out["hotspots"]["thread_handoff_cpu_seconds_per_round"] = threaded - out["hotspots"][
        "inline_cpu_seconds_per_round"]
    free_10hz = out["backends"]["free"]["loop"]["10hz"]["core_share"]
    out["worst_core_share_at_10hz"] = max(b["loop"]["10hz"]["core_share"] for b in out["backends"].values())
    out["free_core_share_at_10hz"] = free_10hz
    out["target_met"] = free_10hz <= TARGET_CORE_SHARE
    sc = scale(scale_gpus, seconds=scale_seconds)
    progress(f"  {sc['gpus']} simulated GPUs: {sc['threads_peak']} threads, rounds of "
             f"{(sc['round_seconds_median'] or 0) * 1e3:.1f} ms median, "
             f"{(sc['round_seconds_max'] or 0) * 1e3:.1f} ms max")
    out["scale"] = sc
    return out
