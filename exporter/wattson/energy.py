"""Turn successive GPU readings into a monotonic energy total.

Two methods: differences of NVML's total-energy counter (exact), or trapezoid integration of
power samples where the counter is not supported. A counter that goes down (driver reload) or
jumps by more than the GPU could possibly draw is a reset: that step counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpu.base import GpuReading


@dataclass(frozen=True)
class EnergyStep:
    """Energy used between two readings, in joules, over [start, end] wall-clock seconds."""

    start: float
    end: float
    joules: float
    reset: bool = False


class EnergyMeter:
    def __init__(self, max_power_watts: float) -> None:
        self.max_power_watts = max_power_watts
        self.method: str | None = None  # "counter" | "integrated", fixed by the first reading
        self.total_joules = 0.0
        self._prev: GpuReading | None = None

    def update(self, reading: GpuReading) -> EnergyStep | None:
        """Account one reading; returns the step since the previous one (None for the first)."""
        if self.method is None or (self.method == "counter" and reading.energy_millijoules is None):
            # The counter can also vanish at runtime; from then on integrate.
            self.method = "counter" if reading.energy_millijoules is not None else "integrated"
        prev, self._prev = self._prev, reading
        if prev is None:
            return None
        dt = reading.monotonic - prev.monotonic
        if dt <= 0:
            return EnergyStep(prev.timestamp, reading.timestamp, 0.0, reset=False)
        if self.method == "counter":
            assert reading.energy_millijoules is not None and prev.energy_millijoules is not None
            delta_mj = reading.energy_millijoules - prev.energy_millijoules
            # 10% and 1 J of slack over the limit absorb counter granularity and timestamp jitter.
            ceiling_j = self.max_power_watts * dt * 1.1 + 1.0
            if delta_mj < 0 or delta_mj / 1000.0 > ceiling_j:
                return EnergyStep(prev.timestamp, reading.timestamp, 0.0, reset=True)
            joules = delta_mj / 1000.0
        else:
            joules = (prev.power_watts + reading.power_watts) / 2.0 * dt
        self.total_joules += joules
        return EnergyStep(prev.timestamp, reading.timestamp, joules)

    def gap(self) -> None:
        """A read failed: the integrated method cannot know what happened in between, so restart the
        baseline. The counter method keeps its baseline: the counter's next difference is exact."""
        if self.method == "integrated":
            self._prev = None
