"""Immutable snapshots: everything a scrape needs, built by the sampler, read without locks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .accounting import AccountSnapshot
from .budgets import Budgets
from .gpu.base import GpuIdentity, GpuReading
from .grid.forecast import SignalForecast
from .grid.signal import SignalNow, SourceSnapshot
from .periods import PeriodTotals
from .workloads.snapshot import WorkloadSnapshot

if TYPE_CHECKING:
    from .state import StorageStatus

__all__ = ["Budgets", "EMPTY", "GpuSnapshot", "SignalNow", "Snapshot", "SourceSnapshot"]


@dataclass(frozen=True)
class GpuSnapshot:
    identity: GpuIdentity
    up: bool
    reading: GpuReading | None  # the last successful reading, kept while the GPU is down
    energy_joules: float
    energy_method: str  # "counter" | "integrated" | "unknown" before the first reading
    errors: tuple[tuple[str, int], ...]  # error kind -> count
    account: AccountSnapshot = field(default_factory=AccountSnapshot)
    unmetered_seconds: float = 0.0
    catching_up: bool = False  # totals restored from the state file, not yet continued by a reading: unexported


@dataclass(frozen=True)
class Snapshot:
    seq: int
    timestamp: float | None  # wall time of the last completed sampling round
    duration_seconds: float
    backend: str
    ready: bool
    gpus: tuple[GpuSnapshot, ...]
    signals: tuple[SignalNow, ...] = ()
    sources: tuple[SourceSnapshot, ...] = ()
    pue: float = 1.0
    budgets: Budgets | None = None
    workloads: WorkloadSnapshot | None = None  # None unless per-workload accounting is enabled
    storage: StorageStatus | None = None  # None when no state is kept
    forecasts: tuple[SignalForecast, ...] = ()  # best windows per signal served now; empty when none fits
    periods: tuple[PeriodTotals, ...] = ()  # this host's day and month totals, per offset


EMPTY = Snapshot(seq=0, timestamp=None, duration_seconds=0.0, backend="", ready=False, gpus=())
