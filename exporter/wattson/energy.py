"""Turn successive GPU readings into a monotonic energy total.

Two methods: differences of NVML's total-energy counter (exact), or trapezoid integration of
power samples where the counter is not supported. A counter that goes down restarted from zero
(driver reload): the step counts the new counter value when the GPU could have drawn that much,
else nothing. A jump beyond what the GPU could possibly draw counts nothing. Time whose energy
cannot be known is reported as unmetered, never guessed.
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
    reset: bool = False  # the counter restarted or jumped impossibly in this step
    unmetered: bool = False  # the energy of [start, end] cannot be known: counted as unmetered time


class EnergyMeter:
    def __init__(self, max_power_watts: float) -> None:
        self.max_power_watts = max_power_watts
        self.method: str | None = None  # "counter" | "integrated", fixed by the first reading
        self.total_joules = 0.0
        self._prev: GpuReading | None = None
        self._gap_since: float | None = None  # wall time of the last reading before a gap (integrated method)
        self._resume: tuple[int | None, float] | None = None  # counter (mJ) and wall time saved by a previous run

    def resume(self, total_joules: float, method: str | None, counter_mj: int | None, wall_time: float,
               counter_runs_on: bool) -> None:
        """Continue a previous run's total. When its energy counter still runs (same boot and driver), the
        first reading counts the counter's difference since `wall_time` as one step; otherwise the time
        between is unmetered."""
        self.total_joules = total_joules
        self.method = method
        self._resume = (counter_mj if counter_runs_on else None, wall_time)

    def _ceiling_joules(self, seconds: float, limit_watts: float | None) -> float:
        """The most a GPU can draw in `seconds`: max_power_watts within a step (short power excursions may pass
        the enforced limit), the enforced limit over a gap across restarts (long enough to average out).
        10% and 1 J of slack absorb counter granularity and timestamp jitter."""
        return (limit_watts or self.max_power_watts) * seconds * 1.1 + 1.0

    def update(self, reading: GpuReading) -> EnergyStep | None:
        """Account one reading; returns the step since the previous one (None for the first)."""
        if self.method is None or (self.method == "counter" and reading.energy_millijoules is None):
            # The counter can also vanish at runtime; from then on integrate.
            self.method = "counter" if reading.energy_millijoules is not None else "integrated"
        prev, self._prev = self._prev, reading
        if prev is None:
            return self._first(reading)
        dt = reading.monotonic - prev.monotonic
        if dt <= 0:
            return EnergyStep(prev.timestamp, reading.timestamp, 0.0, reset=False)
        if self.method == "counter":
            assert reading.energy_millijoules is not None and prev.energy_millijoules is not None
            delta_mj = reading.energy_millijoules - prev.energy_millijoules
            ceiling_j = self._ceiling_joules(dt, None)
            if delta_mj < 0:  # restarted from zero within this step (driver reload)
                if reading.energy_millijoules / 1000.0 > ceiling_j:
                    return EnergyStep(prev.timestamp, reading.timestamp, 0.0, reset=True, unmetered=True)
                return self._count(prev.timestamp, reading.timestamp, reading.energy_millijoules / 1000.0, True)
            if delta_mj / 1000.0 > ceiling_j:
                return EnergyStep(prev.timestamp, reading.timestamp, 0.0, reset=True, unmetered=True)
            joules = delta_mj / 1000.0
        else:
            joules = (prev.power_watts + reading.power_watts) / 2.0 * dt
        return self._count(prev.timestamp, reading.timestamp, joules)

    def _first(self, reading: GpuReading) -> EnergyStep | None:
        """The first reading after start or a gap: a baseline, unless a previous run or an integration gap
        left time to account."""
        resume, self._resume = self._resume, None
        since, self._gap_since = self._gap_since, None
        if resume is not None:
            counter_mj, wall = resume
            seconds = reading.timestamp - wall
            if seconds <= 0:
                return None
            now_mj = reading.energy_millijoules
            if self.method == "counter" and counter_mj is not None and now_mj is not None \
                    and 0 <= now_mj - counter_mj and (now_mj - counter_mj) / 1000.0 <= self._ceiling_joules(
                        seconds, reading.power_limit_watts):
                return self._count(wall, reading.timestamp, (now_mj - counter_mj) / 1000.0)
            return EnergyStep(wall, reading.timestamp, 0.0, unmetered=True)
        if since is not None and reading.timestamp > since:
            return EnergyStep(since, reading.timestamp, 0.0, unmetered=True)
        return None

    def _count(self, start: float, end: float, joules: float, reset: bool = False) -> EnergyStep:
        self.total_joules += joules
        return EnergyStep(start, end, joules, reset=reset)

    def gap(self) -> None:
        """A read failed: the integrated method cannot know what happened in between, so restart the
        baseline and count the time until the next reading as unmetered. The counter method keeps its
        baseline: the counter's next difference is exact."""
        if self.method == "integrated" and self._prev is not None:
            self._gap_since = self._prev.timestamp
            self._prev = None
