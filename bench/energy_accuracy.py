"""Benchmark 3: energy accuracy against an exactly known ground truth, on bursty power profiles.

The GPU's power is a square wave whose integral is known in closed form. wattson's EnergyMeter is fed
readings at its sampling times (with 0.5 ms of scheduling jitter), either with an NVML-style energy
counter (exact integral, in whole mJ) or with power only (trapezoid integration), and what a
Prometheus user computes from 15 s scrapes is emulated from the values wattson would have exposed at
each scrape: increase() on the energy counter (with Prometheus's extrapolation), avg_over_time() on
the power gauge times the window, and a trapezoid over the 15 s gauge samples. Each trial draws a
random phase between the profile, the sampler and the scrapes; errors are signed, in percent.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wattson.energy import EnergyMeter
from wattson.gpu.base import GpuReading

JITTER_SECONDS = 0.0005
SCRAPE_INTERVAL_SECONDS = 15.0
GAUGE_SAMPLER_HZ = 1.0  # wattson's default interval: the power gauge changes once a second


@dataclass(frozen=True)
class SquareWave:
    """high_watts for high_seconds, then low_watts for low_seconds, repeating from t = 0."""

    name: str
    high_watts: float
    high_seconds: float
    low_watts: float
    low_seconds: float

    @property
    def period(self) -> float:
        return self.high_seconds + self.low_seconds

    def power(self, t: float) -> float:
        return self.high_watts if t % self.period < self.high_seconds else self.low_watts

    def energy(self, t: float) -> float:
        """Exact energy in joules over [0, t]."""
        n = math.floor(t / self.period)
        r = t - n * self.period
        per_period = self.high_watts * self.high_seconds + self.low_watts * self.low_seconds
        return n * per_period + self.high_watts * min(r, self.high_seconds) + self.low_watts * max(
            0.0, r - self.high_seconds)


PROFILES = (
    SquareWave("steps: 2 s at 620 W / 0.5 s at 180 W", 620.0, 2.0, 180.0, 0.5),
    SquareWave("spikes: 50 ms at 620 W every 1 s (180 W between)", 620.0, 0.05, 180.0, 0.95),
    SquareWave("spikes: 50 ms at 620 W every 0.73 s (180 W between)", 620.0, 0.05, 180.0, 0.68),
)

METHODS = (
    "counter",
    "integrated_10hz",
    "integrated_1hz",
    "promql_increase_counter_15s",
    "promql_avg_over_time_gauge_15s",
    "trapezoid_gauge_15s",
)

METHOD_LABELS = {
    "counter": "energy counter (NVML total energy, differences; 1 Hz sampling)",
    "integrated_10hz": "power integration at 10 Hz (trapezoid, no counter)",
    "integrated_1hz": "power integration at 1 Hz (trapezoid, no counter)",
    "promql_increase_counter_15s": "user: increase(wattson_gpu_energy_joules_total[1h]), 15 s scrapes",
    "promql_avg_over_time_gauge_15s": "user: avg_over_time(wattson_gpu_power_watts[1h]) * 3600, 15 s scrapes",
    "trapezoid_gauge_15s": "user: trapezoid over 15 s samples of wattson_gpu_power_watts",
}


def sample_times(start: float, end: float, hz: float, rng: random.Random) -> list[float]:
    step = 1.0 / hz
    n = int((end - start) * hz) + 1
    times = [start + k * step + rng.gauss(0.0, JITTER_SECONDS) for k in range(n)]
    return sorted(times)


def meter_run(profile: SquareWave, times: list[float], counter: bool,
              on_reading: Callable[[float, float, float], None] | None = None) -> float:
    """Feed readings at `times` to an EnergyMeter; returns its total. on_reading(t, watts, total)."""
    meter = EnergyMeter(max_power_watts=3000.0)
    offset_mj = 123_456_789  # counters count from driver load, not from zero
    for t in times:
        watts = profile.power(t)
        mj = offset_mj + int(profile.energy(t) * 1000.0) if counter else None
        meter.update(GpuReading(t, t, watts, mj, 700.0, None, None, None))
        if on_reading is not None:
            on_reading(t, watts, meter.total_joules)
    return meter.total_joules


def prometheus_increase(samples: list[tuple[float, float]], range_start: float, range_end: float) -> float:
    """increase() as Prometheus computes it (extrapolatedRate for a counter without resets)."""
    if len(samples) < 2:
        return math.nan
    (t_first, v_first), (t_last, v_last) = samples[0], samples[-1]
    result = v_last - v_first
    sampled = t_last - t_first
    to_start = t_first - range_start
    to_end = range_end - t_last
    avg_step = sampled / (len(samples) - 1)
    if result > 0 and v_first >= 0:
        to_start = min(to_start, sampled * (v_first / result))  # a counter does not extrapolate below zero
    threshold = avg_step * 1.1
    extrapolated = sampled + (to_start if to_start < threshold else avg_step / 2) + (
        to_end if to_end < threshold else avg_step / 2)
    return result * extrapolated / sampled


def _pct(estimate: float, truth: float) -> float:
    return (estimate - truth) / truth * 100.0


def trial(profile: SquareWave, window_seconds: float, rng: random.Random) -> dict[str, float]:
    """One trial at a random phase: signed error in percent of every method."""
    t0 = rng.uniform(0.0, 1000.0)
    errors: dict[str, float] = {}

    # wattson's own totals over its first..last reading.
    for key, hz, counter in (("counter", 1.0, True), ("integrated_10hz", 10.0, False),
                             ("integrated_1hz", 1.0, False)):
        times = sample_times(t0, t0 + window_seconds, hz, rng)
        total = meter_run(profile, times, counter)
        errors[key] = _pct(total, profile.energy(times[-1]) - profile.energy(times[0]))

    # What the exposed series look like to Prometheus: the 1 Hz sampler with the counter method
    # (what NVML GPUs since Volta use) publishes power and energy once a second; scrapes every 15 s.
    lead = 2 * SCRAPE_INTERVAL_SECONDS
    readings: list[tuple[float, float, float]] = []
    meter_run(profile, sample_times(t0, t0 + window_seconds + 2 * lead, GAUGE_SAMPLER_HZ, rng), True,
              lambda t, w, total: readings.append((t, w, total)))
    reading_times = [r[0] for r in readings]
    range_start = t0 + lead
    range_end = range_start + window_seconds
    scrape = rng.uniform(t0 + 1.0, t0 + 1.0 + SCRAPE_INTERVAL_SECONDS)
    gauge: list[tuple[float, float]] = []
    counter_series: list[tuple[float, float]] = []
    while scrape <= range_end:
        if scrape > range_start:
            _t, watts, total = readings[bisect.bisect_right(reading_times, scrape) - 1]
            gauge.append((scrape, watts))
            counter_series.append((scrape, total))
        scrape += SCRAPE_INTERVAL_SECONDS
    truth_window = profile.energy(range_end) - profile.energy(range_start)
    errors["promql_increase_counter_15s"] = _pct(prometheus_increase(counter_series, range_start, range_end),
                                                 truth_window)
    errors["promql_avg_over_time_gauge_15s"] = _pct(
        statistics.fmean(w for _t, w in gauge) * window_seconds, truth_window)
    trap = sum((w0 + w1) / 2 * (t1 - t0_) for (t0_, w0), (t1, w1) in zip(gauge, gauge[1:], strict=False))
    errors["trapezoid_gauge_15s"] = _pct(trap, profile.energy(gauge[-1][0]) - profile.energy(gauge[0][0]))
    return errors


def run(window_seconds: float = 3600.0, trials: int = 20, seed: int = 5,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {"window_seconds": window_seconds, "trials": trials, "seed": seed,
                           "jitter_seconds": JITTER_SECONDS,
                           "scrape_interval_seconds": SCRAPE_INTERVAL_SECONDS,
                           "methods": {k: METHOD_LABELS[k] for k in METHODS}, "profiles": []}
    for profile in PROFILES:
        per_method: dict[str, list[float]] = {k: [] for k in METHODS}
        for _ in range(trials):
            for k, v in trial(profile, window_seconds, rng).items():
                per_method[k].append(v)
        summary = {k: {"mean_error_pct": statistics.fmean(v),
                       "median_abs_error_pct": statistics.median(abs(x) for x in v),
                       "max_abs_error_pct": max(abs(x) for x in v)} for k, v in per_method.items()}
        out["profiles"].append({"name": profile.name,
                                "mean_watts": profile.energy(profile.period) / profile.period,
                                "errors": summary})
        progress(f"  {profile.name}: " + ", ".join(
            f"{k} max |{s['max_abs_error_pct']:.2f}|%" for k, s in summary.items()))
    return out
