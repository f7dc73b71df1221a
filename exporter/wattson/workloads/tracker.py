"""Per-workload energy, cost and CO2e, charged step by step and published as immutable snapshots.

Every accounted step of every GPU is split between the workloads whose processes ran on it
(attribution.py) and added to monotonic per-(GPU, workload) totals. Nothing is dropped: a GPU with
no compute process charges `kind="idle"`, one whose processes cannot be listed or identified
charges `kind="unattributed"` (in both cases the pods the kubelet allocated the GPU to instead, where it
did: podresources.py), and workloads beyond the series cap charge `kind="overflow"`. So the
workload series of a GPU always add up to the GPU's own energy, cost and CO2e.

Threads: `on_step` runs in the sampler's GPU reader thread; `snapshot` runs in the sampler thread
after each round and returns a `WorkloadSnapshot` that exposition.py renders at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from threading import Lock
from typing import TYPE_CHECKING, Any

from ..accounting import StepCharge
from ..config import WorkloadsConfig
from ..energy import EnergyStep
from ..gpu.base import GpuReading
from ..logfmt import kv
from ..periods import ScopePeriods, step_time
from .attribution import (
    METHOD_IDLE,
    METHOD_UNATTRIBUTED,
    ExactSum,
    integer_weights,
    process_weights,
    split_exact,
)
from .cgroup import (
    DEFAULT_POD_METADATA_FILES,
    KIND_POD,
    PodMetadata,
    ProcFS,
    ProcReader,
    UserNames,
    Workload,
    WorkloadResolver,
)
from .podresources import METHOD_POD_ALLOCATION, PodResourcesSource, build_source
from .simulated_proc import SimulatedProcFS, simulated_procfs
from .snapshot import GpuAttribution, WorkloadInfo, WorkloadSeries, WorkloadSnapshot

if TYPE_CHECKING:
    from ..sampler import Sampler

log = logging.getLogger("wattson.workloads")

KIND_IDLE = "idle"
KIND_UNATTRIBUTED = "unattributed"
KIND_OVERFLOW = "overflow"
# Per-GPU buckets: bounded in number, never expire, not counted against max_series.
SPECIAL_KINDS = (KIND_IDLE, KIND_UNATTRIBUTED, KIND_OVERFLOW)

IDLE = Workload(KIND_IDLE, "idle")
NO_PROCESS_LIST = Workload(KIND_UNATTRIBUTED, "no_process_list")  # NVML gave no process list
UNKNOWN_PROCESS = Workload(KIND_UNATTRIBUTED, "unknown_process")  # a PID not found (or readable) in /proc
ATTRIBUTION_ERROR = Workload(KIND_UNATTRIBUTED, "error")  # a bug in attribution: the step is kept anyway
OVERFLOW = Workload(KIND_OVERFLOW, "overflow")

LABELS = ["kind", "workload", "gpu", "uuid"]
GPU_LABELS = ["gpu", "uuid"]

SeriesKey = tuple[int, str, str, str]  # gpu index, uuid, kind, workload id


@dataclass
class _Totals:
    """Exact monotonic totals of one (GPU, workload) series."""

    energy_joules: ExactSum = field(default_factory=ExactSum)
    cost: dict[str, ExactSum] = field(default_factory=dict)  # currency -> positive amounts
    credit: dict[str, ExactSum] = field(default_factory=dict)  # currency -> |negative amounts|
    co2e_grams: ExactSum = field(default_factory=ExactSum)
    last_seen: float = 0.0


@dataclass(frozen=True)
class StepShare:
    """One workload's part of one step (tests and debugging use these)."""

    workload: Workload
    energy_joules: float
    cost: tuple[tuple[str, float], ...]  # currency -> signed amount
    co2e_grams: float


class WorkloadTracker:
    def __init__(self, resolver: WorkloadResolver, retention_seconds: float, max_series: int,
                 clock: Callable[[], float] = time.time, period_offsets: Sequence[int] = (0,)) -> None:
        self.resolver = resolver
        self.retention_seconds = retention_seconds
        self.max_series = max_series
        self.clock = clock
        self._lock = Lock()
        self._series: dict[SeriesKey, _Totals] = {}
        self._workload_series = 0  # series not of a SPECIAL_KIND, the ones max_series limits
        self._info: dict[tuple[str, str], Workload] = {}
        self._methods: dict[tuple[int, str], str] = {}
        self._overflowed: dict[tuple[int, str], int] = {}
        self._last_render: float | None = None
        self._last_prune = 0.0
        # The immutable view: series charged since the last snapshot are `_dirty` and rebuilt then.
        self._dirty: set[SeriesKey] = set()
        self._changed = True  # anything else (a new GPU, method, overflow, expiry) since the last snapshot
        self._keys_changed = True
        self._frozen: dict[SeriesKey, WorkloadSeries] = {}
        self._order: list[SeriesKey] = []
        self._info_snapshot: tuple[WorkloadInfo, ...] = ()
        self._snapshot: WorkloadSnapshot | None = None
        self._scopes = ScopePeriods(period_offsets)  # day and month totals per namespace, account and user
        self.kubelet: PodResourcesSource | None = None  # pods holding each GPU, per the kubelet (podresources.py)

    def add_gpu(self, index: int, uuid: str) -> None:
        """Make a GPU's overflow counter visible (at 0) before its first step."""
        with self._lock:
            self._overflowed.setdefault((index, uuid), 0)
            self._changed = True

    # -- GPU worker threads ------------------------------------------------------------------------

    def on_step(self, gpu_index: int, uuid: str, step: EnergyStep, charge: StepCharge,
                reading: GpuReading) -> None:
        """The sampler's StepListener. Never raises: a failure charges the step to unattributed."""
        try:
            method, shares = self.split(step, charge, reading, uuid)
        except Exception:
            log.exception("workload attribution failed; step charged to unattributed",
                          extra=kv(gpu=gpu_index, uuid=uuid))
            method, shares = METHOD_UNATTRIBUTED, [StepShare(ATTRIBUTION_ERROR, step.joules, charge.cost,
                                                             charge.co2e_grams)]
        try:
            self._record(gpu_index, uuid, method, shares, self.clock(), step_time(step.start, step.end))
        except Exception:  # e.g. a non-finite amount: the GPU's own accounting must go on regardless
            log.exception("workload accounting failed; step not charged to workloads",
                          extra=kv(gpu=gpu_index, uuid=uuid))

    def split(self, step: EnergyStep, charge: StepCharge, reading: GpuReading,
              uuid: str = "") -> tuple[str, list[StepShare]]:
        """The attribution method and every workload's exact part of the step. Shares add up exactly
        to step.joules (GPU energy, no PUE, as wattson_gpu_energy_joules_total), to each currency's
        amount and to the grams of `charge` (facility energy x price / intensity)."""
        method, weighted = self._weights(reading, uuid)
        workloads = [w for w, _ in weighted]
        weights = integer_weights([wt for _, wt in weighted])
        energy = split_exact(step.joules, weights)
        costs = [(currency, split_exact(amount, weights)) for currency, amount in charge.cost]
        grams = split_exact(charge.co2e_grams, weights)
        return method, [
            StepShare(w, energy[i], tuple((c, parts[i]) for c, parts in costs), grams[i])
            for i, w in enumerate(workloads)
        ]

    def _weights(self, reading: GpuReading, uuid: str = "") -> tuple[str, list[tuple[Workload, Fraction]]]:
        processes = reading.processes
        kubelet = self.kubelet
        holds = kubelet.holds(uuid) if kubelet is not None else ()
        if kubelet is not None and holds and not processes:
            # Allocated but no process seen (or no list): the pods that reserved the GPU pay for it.
            return METHOD_POD_ALLOCATION, kubelet.allocation_weights(holds)
        if processes is None:
            return METHOD_UNATTRIBUTED, [(NO_PROCESS_LIST, Fraction(1))]
        if not processes:
            return METHOD_IDLE, [(IDLE, Fraction(1))]
        method, weights = process_weights(processes)
        by_workload: dict[tuple[str, str], tuple[Workload, Fraction]] = {}
        unresolved: list[tuple[int | None, Fraction]] = []  # processes the kubelet's pods may own

        def add(workload: Workload, weight: Fraction) -> None:
            prev = by_workload.get(workload.key)
            by_workload[workload.key] = (workload, weight + (prev[1] if prev else 0))

        for proc, weight in zip(processes, weights, strict=True):
            if weight == 0:
                continue
            resolved = self.resolver.resolve(proc.pid)
            if resolved is None and holds:
                unresolved.append((proc.gpu_instance_id, weight))
                continue
            if kubelet is not None and resolved is not None:
                kubelet.learn(resolved)
            add(resolved or UNKNOWN_PROCESS, weight)
        if kubelet is not None and unresolved:
            seen = {(w.namespace, w.pod) for w, _ in by_workload.values() if w.kind == KIND_POD}
            for pod, weight in kubelet.assign(holds, unresolved, seen):
                add(pod or UNKNOWN_PROCESS, weight)
        return method, [by_workload[k] for k in sorted(by_workload)]

    def _record(self, gpu_index: int, uuid: str, method: str, shares: list[StepShare], now: float,
                at: float | None = None) -> None:
        with self._lock:
            self._changed = True
            self._methods[(gpu_index, uuid)] = method
            self._overflowed.setdefault((gpu_index, uuid), 0)
            for share in shares:
                workload = share.workload
                if at is not None:  # the scopes of the workload itself, whether or not its series overflows
                    self._scopes.add(at, scope_keys(workload), share.energy_joules, share.cost, share.co2e_grams)
                key = (gpu_index, uuid, workload.kind, workload.id)
                totals = self._series.get(key)
                if totals is None:
                    special = workload.kind in SPECIAL_KINDS
                    if not special and self._workload_series >= self.max_series:
                        self._overflowed[(gpu_index, uuid)] += 1
                        workload = OVERFLOW
                        key = (gpu_index, uuid, OVERFLOW.kind, OVERFLOW.id)
                        totals = self._series.get(key)
                    elif not special:
                        self._workload_series += 1
                    if totals is None:
                        totals = self._series[key] = _Totals()
                        self._keys_changed = True
                if workload.kind not in SPECIAL_KINDS and self._info.get(workload.key) != workload:
                    self._info[workload.key] = workload
                    self._keys_changed = True
                _add(totals, share)
                totals.last_seen = now
                self._dirty.add(key)

    # -- sampler thread ----------------------------------------------------------------------------

    def snapshot(self, now: float) -> WorkloadSnapshot:
        """The totals after a round, immutable. Only series charged since the last call are rebuilt, and
        an unchanged tracker returns the previous snapshot itself, so a round costs little at the cap."""
        self._expire(now)
        if now - self._last_prune > 60.0:
            self._last_prune = now
            self.resolver.prune()
        kubelet = self.kubelet.status if self.kubelet is not None else None
        with self._lock:
            scopes = self._scopes.snapshot(now)
            if self._snapshot is not None and self._snapshot.scope_periods is not scopes:
                self._snapshot = replace(self._snapshot, scope_periods=scopes)
            if not self._changed and self._snapshot is not None:
                if self._snapshot.kubelet is not kubelet:
                    self._snapshot = replace(self._snapshot, kubelet=kubelet)
                return self._snapshot
            for key in self._dirty:
                t = self._series.get(key)
                if t is None:
                    self._frozen.pop(key, None)
                    continue
                self._frozen[key] = WorkloadSeries(
                    key[0], key[1], key[2], key[3], t.energy_joules.value,
                    tuple((c, t.cost[c].value) for c in sorted(t.cost)),
                    tuple((c, t.credit[c].value) for c in sorted(t.credit)), t.co2e_grams.value)
            if self._keys_changed:
                self._order = sorted(self._frozen)
                self._info_snapshot = tuple(WorkloadInfo(k, wid, w.user, w.pod, w.namespace)
                                            for (k, wid), w in sorted(self._info.items()))
            self._dirty.clear()
            self._changed = self._keys_changed = False
            gpus = tuple(GpuAttribution(gpu, uuid, self._methods.get((gpu, uuid)), n)
                         for (gpu, uuid), n in sorted(self._overflowed.items()))
            self._snapshot = WorkloadSnapshot(tuple(self._frozen[k] for k in self._order), self._info_snapshot,
                                              gpus, self._workload_series, kubelet=kubelet, scope_periods=scopes)
            return self._snapshot

    def _expire(self, now: float) -> None:
        """Drop workload series last charged more than retention_seconds ago (and not since the last
        render, so a zero retention still shows every workload once)."""
        prev_render, self._last_render = self._last_render, now
        with self._lock:
            expired = [key for key, t in self._series.items()
                       if key[2] not in SPECIAL_KINDS and now - t.last_seen > self.retention_seconds
                       and (prev_render is None or t.last_seen < prev_render)]
            for key in expired:
                del self._series[key]
                self._workload_series -= 1
                self._dirty.add(key)
            if expired:
                self._changed = self._keys_changed = True
            if expired:
                live = {(k[2], k[3]) for k in self._series}
                for wkey in [k for k in self._info if k not in live]:
                    del self._info[wkey]

    # -- durable state -------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Every series' totals and the workloads' descriptions, JSON-serialisable, for the state file."""
        with self._lock:
            return {
                "series": [[gpu, uuid, kind, wid, t.energy_joules.value, {c: v.value for c, v in t.cost.items()},
                            {c: v.value for c, v in t.credit.items()}, t.co2e_grams.value]
                           for (gpu, uuid, kind, wid), t in self._series.items()],
                "info": [[w.kind, w.id, w.user, w.pod, w.namespace] for w in self._info.values()],
                "overflowed": [[gpu, uuid, n] for (gpu, uuid), n in self._overflowed.items()],
                "scope_periods": self._scopes.export(),
            }

    def restore_state(self, data: dict[str, Any]) -> int:
        """Continue the totals a previous run saved (series of GPUs this host has again); returns how many
        entries were malformed and skipped. Restored workloads expire by retention from now."""
        now = self.clock()
        bad = 0
        with self._lock:
            for entry in data.get("series", []) if isinstance(data.get("series"), list) else []:
                try:
                    gpu, uuid, kind, wid, energy, cost, credit, grams = entry
                    key = (int(gpu), str(uuid), str(kind), str(wid))
                    totals = _Totals()
                    totals.energy_joules.add(float(energy))
                    for currency, amount in dict(cost).items():
                        totals.cost.setdefault(str(currency), ExactSum()).add(float(amount))
                    for currency, amount in dict(credit).items():
                        totals.credit.setdefault(str(currency), ExactSum()).add(float(amount))
                    totals.co2e_grams.add(float(grams))
                    if min(totals.energy_joules.value, totals.co2e_grams.value) < 0:
                        raise ValueError("negative total")
                except (TypeError, ValueError):
                    bad += 1
                    continue
                totals.last_seen = now
                if key not in self._series and key[2] not in SPECIAL_KINDS:
                    if self._workload_series >= self.max_series:
                        continue  # the cap may have been lowered: keep within it
                    self._workload_series += 1
                self._series[key] = totals
                self._dirty.add(key)
            for entry in data.get("info", []) if isinstance(data.get("info"), list) else []:
                try:
                    kind, wid, user, pod, namespace = (str(x) for x in entry)
                except (TypeError, ValueError):
                    bad += 1
                    continue
                if any(k[2] == kind and k[3] == wid for k in self._series):
                    self._info[(kind, wid)] = Workload(kind, wid, user, pod, namespace)
            for entry in data.get("overflowed", []) if isinstance(data.get("overflowed"), list) else []:
                try:
                    gpu, uuid, n = entry
                    self._overflowed[(int(gpu), str(uuid))] = max(int(n), self._overflowed.get((int(gpu),
                                                                                                 str(uuid)), 0))
                except (TypeError, ValueError):
                    bad += 1
            bad += self._scopes.restore(data.get("scope_periods"), now)
            self._changed = self._keys_changed = True
        return bad

    # -- tests -------------------------------------------------------------------------------------

    def exact_scope_totals(self, scope: str, value: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Exact period totals of one scope value (Fractions) per (period, offset), for tests."""
        with self._lock:
            return self._scopes.ledger.exact((scope, value))

    def exact_totals(self) -> dict[SeriesKey, dict[str, Any]]:
        """Exact totals per series (Fractions), for conservation tests."""
        with self._lock:
            return {key: {"energy_joules": t.energy_joules.exact, "co2e_grams": t.co2e_grams.exact,
                          "cost": {c: s.exact for c, s in t.cost.items()},
                          "credit": {c: s.exact for c, s in t.credit.items()}}
                    for key, t in self._series.items()}


def scope_keys(w: Workload) -> tuple[tuple[str, str], ...]:
    """The budget scope values (namespace, Slurm account, user) a workload's energy counts for; none for the
    idle, unattributed and overflow buckets."""
    return tuple((scope, value) for scope, value in (("namespace", w.namespace), ("account", w.account),
                                                      ("user", w.user)) if value)


def _add(totals: _Totals, share: StepShare) -> None:
    totals.energy_joules.add(share.energy_joules)
    for currency, amount in share.cost:
        totals.cost.setdefault(currency, ExactSum())
        totals.credit.setdefault(currency, ExactSum())
        if amount >= 0:
            totals.cost[currency].add(amount)
        else:
            totals.credit[currency].add(-amount)
    totals.co2e_grams.add(share.co2e_grams)


def build_resolver(cfg: WorkloadsConfig, backend: object | None = None) -> WorkloadResolver:
    """The resolver for the configured /proc root; a simulated backend with jobs brings its own
    in-memory /proc (same file formats) with the users and pods its jobs describe."""
    procfs = simulated_procfs(backend)
    proc: ProcReader
    if procfs is not None:
        proc = procfs
        users = UserNames(resolve=False, known=procfs.users)
        pods = PodMetadata((), known=procfs.pods)
    else:
        proc = ProcFS(cfg.proc_root)
        users = UserNames(resolve=cfg.resolve_user_names, passwd_file=cfg.passwd_file)
        pods = PodMetadata(tuple(cfg.pod_metadata_files))
    return WorkloadResolver(proc, users, pods, cfg.bare_processes)


def attach(sampler: Sampler, backend: object, cfg: WorkloadsConfig) -> WorkloadTracker:
    """Wire per-workload accounting into a sampler. The backend must have been built to list each GPU's
    processes (cli.build_backend does so when workloads are enabled)."""
    resolver = build_resolver(cfg, backend)
    tracker = WorkloadTracker(resolver, cfg.retention_seconds, cfg.max_series, clock=sampler.clock,
                              period_offsets=sampler.periods.offsets)
    for gpu in sampler.gpus:
        tracker.add_gpu(gpu.identity.index, gpu.identity.uuid)
    sampler.workloads = tracker
    tracker.kubelet = build_source(cfg, lambda: sampler.gpus, getattr(backend, "name", ""))
    if tracker.kubelet is not None:
        tracker.kubelet.start()
    log.info("per-workload accounting enabled",
             extra=kv(proc_root="(simulated)" if isinstance(resolver.proc, SimulatedProcFS) else cfg.proc_root,
                      retention_seconds=cfg.retention_seconds, max_series=cfg.max_series))
    return tracker


__all__ = ["attach", "WorkloadTracker", "StepShare", "build_resolver", "DEFAULT_POD_METADATA_FILES"]
