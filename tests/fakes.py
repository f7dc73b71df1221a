"""Small fakes shared by core tests: a settable clock, a GPU with a known power profile, grid sources."""

from __future__ import annotations

import threading
from collections.abc import Callable

from wattson.gpu.base import GpuIdentity, GpuReadError, GpuReading
from wattson.grid.base import FetchResult, Interval, SourceError

T0 = 1_798_185_600.0  # 2026-12-25T00:00:00Z, on an hour boundary


class Clock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - T0

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ConstantGpu:
    """A GPU drawing `watts` whose NVML-style counter is the exact integral (mJ)."""

    def __init__(self, index: int, clock: Clock, watts: float = 1000.0, counter: bool = True) -> None:
        self.identity = GpuIdentity(index, f"GPU-{index:08d}-0000-0000-0000-000000000000", "Fake GPU",
                                    f"00000000:{index:02X}:00.0", "550.00")
        self.clock = clock
        self.watts = watts
        self.counter = counter
        self.fail_with: GpuReadError | None = None
        self.hang: threading.Event | None = None
        self._energy_mj = 0.0
        self._last = clock.monotonic()

    def read(self) -> GpuReading:
        if self.hang is not None:
            self.hang.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        mono = self.clock.monotonic()
        self._energy_mj += self.watts * (mono - self._last) * 1000
        self._last = mono
        return GpuReading(self.clock.time(), mono, self.watts,
                          round(self._energy_mj) if self.counter else None, 700.0, 1, 2, 0.5)


class ListBackend:
    name = "fake"
    simulated = False
    counter_epoch = "fake-boot"

    def __init__(self, devices: list) -> None:
        self.devices = devices

    def start(self) -> list:
        return list(self.devices)

    def restart(self) -> list:
        return list(self.devices)

    def close(self) -> None:
        pass


class ScriptedSource:
    """A grid source returning given intervals, or failing while `error` is set."""

    poll_interval_seconds = 60.0

    def __init__(self, name: str, signal: str, intervals: list[tuple[float, float, float]],
                 currency: str | None = None, zone: str = "DE") -> None:
        self.name = name
        self.signal = signal
        self.zone = zone
        self.intervals = intervals
        self.currency = currency
        self.error: SourceError | None = None
        self.calls = 0

    def fetch(self, now: float) -> FetchResult:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return FetchResult(tuple(Interval(a, b, v) for a, b, v in self.intervals), self.currency)

    def secrets(self) -> tuple[str, ...]:
        return ()


def run_for(sampler, clock: Clock, seconds: float, step: float,
            between: Callable[[float], None] | None = None) -> None:
    """Advance the fake clock in `step`s, one sampling round each, for `seconds`."""
    elapsed = 0.0
    while elapsed < seconds - 1e-9:
        dt = min(step, seconds - elapsed)  # the last step is shortened to land exactly on `seconds`
        clock.advance(dt)
        elapsed += dt
        if between:
            between(elapsed)
        sampler.sample_round()
