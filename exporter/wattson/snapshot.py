"""Immutable snapshots: everything a scrape needs, built by the sampler, read without locks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .accounting import AccountSnapshot
from .gpu.base import GpuIdentity, GpuReading


@dataclass(frozen=True)
class GpuSnapshot:
    identity: GpuIdentity
    up: bool
    reading: GpuReading | None  # the last successful reading, kept while the GPU is down
    energy_joules: float
    energy_method: str  # "counter" | "integrated" | "unknown" before the first reading
    errors: tuple[tuple[str, int], ...]  # error kind -> count
    account: AccountSnapshot = field(default_factory=AccountSnapshot)


@dataclass(frozen=True)
class SignalNow:
    """A grid signal as it stands at the snapshot's time."""

    signal: str
    zone: str
    value: float | None  # None = unknown: the gauge is then absent, never 0
    currency: str | None
    source: str | None
    estimated: bool
    age_seconds: float | None
    source_index: int | None = None  # position of `source` in the chain; > 0 means a fallback serves


@dataclass(frozen=True)
class SourceSnapshot:
    source: str
    up: bool | None
    errors: tuple[tuple[str, int], ...]
    last_success: float | None


@dataclass(frozen=True)
class Budgets:
    currency: str
    cost: tuple[tuple[str, float], ...]  # period -> amount
    co2e_grams: tuple[tuple[str, float], ...]
    intensity_threshold: float | None


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
    extra: tuple[object, ...] = ()  # additional immutable families (e.g. workloads), rendered as given


EMPTY = Snapshot(seq=0, timestamp=None, duration_seconds=0.0, backend="", ready=False, gpus=())
