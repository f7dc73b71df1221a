"""Immutable per-workload totals, built by the tracker after each round and rendered at scrape time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..periods import ScopePeriodTotals


@dataclass(frozen=True)
class WorkloadSeries:
    """The totals of one workload on one GPU (or of one of the GPU's idle, unattributed and overflow buckets)."""

    gpu: int
    uuid: str
    kind: str
    workload: str
    energy_joules: float
    cost: tuple[tuple[str, float], ...]  # currency -> positive amounts
    credit: tuple[tuple[str, float], ...]  # currency -> |negative amounts|
    co2e_grams: float


@dataclass(frozen=True)
class WorkloadInfo:
    kind: str
    workload: str
    user: str
    pod: str
    namespace: str


@dataclass(frozen=True)
class GpuAttribution:
    """How a GPU's last step was split, and how many shares went to its overflow bucket."""

    gpu: int
    uuid: str
    method: str | None  # None before the GPU's first accounted step
    overflowed: int


@dataclass(frozen=True)
class KubeletStatus:
    """Health of the kubelet PodResources source (podresources.py), replaced whole when it changes."""

    up: bool | None  # the last List answered and decoded; None before the first poll
    errors: tuple[tuple[str, int], ...]  # reason -> failed calls
    last_success: float | None  # UNIX time of the last good List
    unmapped_devices: int  # GPU device ids the kubelet names that match none of this host's GPUs


@dataclass(frozen=True)
class WorkloadSnapshot:
    series: tuple[WorkloadSeries, ...]  # ordered by (gpu, uuid, kind, workload)
    info: tuple[WorkloadInfo, ...]  # ordered by (kind, workload)
    gpus: tuple[GpuAttribution, ...]  # ordered by (gpu, uuid)
    workload_series: int  # series limited by max_series (idle, unattributed and overflow excluded)
    kubelet: KubeletStatus | None = None  # None unless the kubelet PodResources source runs
    # Day and month totals per budget scope value (namespace, account, user); see periods.ScopePeriods.
    scope_periods: tuple[ScopePeriodTotals, ...] = ()


EMPTY_WORKLOADS = WorkloadSnapshot((), (), (), 0)
