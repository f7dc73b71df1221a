"""Prometheus exposition of a Snapshot, in client_python's custom-collector style.

The text is rendered once per snapshot and cached, so a scrape costs a dictionary lookup and a
socket write however many scrapers there are. Nothing here calls NVML or the network.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .budgets import budget_metrics
from .gpu.base import ERROR_KINDS
from .grid.base import ERROR_REASONS
from .snapshot import Snapshot
from .state import LOAD_REASONS, SAVE_REASONS, StorageStatus
from .workloads.podresources import ERROR_REASONS as KUBELET_ERROR_REASONS
from .workloads.snapshot import KubeletStatus, WorkloadSnapshot

GPU = ["gpu", "uuid"]


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels if labels is not None else GPU)


def snapshot_metrics(snap: Snapshot) -> Iterator[Metric]:
    build = GaugeMetricFamily("wattson_build_info", "wattson build information; always 1.", labels=["version"])
    build.add_metric([__version__], 1)
    yield build
    yield from _gpu_metrics(snap)
    yield from _grid_metrics(snap)
    yield from _forecast_metrics(snap)
    yield from _budget_metrics(snap)
    yield from _period_metrics(snap)
    sd = GaugeMetricFamily("wattson_sampler_duration_seconds",
                           "Wall-clock duration of the last sampling round over all GPUs.")
    sd.add_metric([], snap.duration_seconds)
    yield sd
    if snap.timestamp is not None:
        ts = GaugeMetricFamily("wattson_last_sample_timestamp_seconds",
                               "UNIX time of the last completed sampling round.")
        ts.add_metric([], snap.timestamp)
        yield ts
    if snap.workloads is not None:
        yield from _workload_metrics(snap.workloads)
        yield from _scope_period_metrics(snap.workloads)
        if snap.workloads.kubelet is not None:
            yield from _kubelet_metrics(snap.workloads.kubelet)
    if snap.storage is not None:
        yield from _storage_metrics(snap.storage)


def _gpu_metrics(snap: Snapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "wattson_gpu_info", "GPU identity; always 1. backend=simulated marks simulated GPUs.",
        labels=["gpu", "uuid", "name", "pci_bus_id", "driver_version", "energy_method", "backend"])
    up = _gauge("wattson_gpu_up", "1 if the last read of this GPU succeeded, 0 if it failed or hung.")
    power = _gauge("wattson_gpu_power_watts", "Power draw of the GPU board in watts.")
    limit = _gauge("wattson_gpu_power_limit_watts", "Enforced power limit in watts.")
    energy = CounterMetricFamily("wattson_gpu_energy_joules", "Energy used by the GPU, in joules (no PUE applied); "
                                 "continued across wattson restarts through the state file.", labels=GPU)
    mem_used = _gauge("wattson_gpu_memory_used_bytes", "GPU memory used in bytes (reserved memory excluded).")
    mem_total = _gauge("wattson_gpu_memory_total_bytes", "GPU memory in bytes.")
    util = _gauge("wattson_gpu_utilization_ratio", "Fraction of the last sample period a kernel was running.")
    cost = CounterMetricFamily("wattson_gpu_cost", "Money paid for this GPU's energy (x PUE) at positive "
                               "prices, in currency units. Net cost = cost - cost_credit.",
                               labels=GPU + ["currency"])
    credit = CounterMetricFamily("wattson_gpu_cost_credit", "Money earned for this GPU's energy (x PUE) at "
                                 "negative prices, as a positive amount in currency units.",
                                 labels=GPU + ["currency"])
    co2e = CounterMetricFamily("wattson_gpu_co2e_grams", "CO2-equivalent emitted for this GPU's energy (x PUE) "
                               "at the grid intensity in force at the time, in grams.", labels=GPU)
    unpriced = CounterMetricFamily("wattson_gpu_unpriced_energy_joules", "Energy (x PUE) used while no value of "
                                   "the signal was known, in joules; not included in cost or co2e.",
                                   labels=GPU + ["signal"])
    errors = CounterMetricFamily("wattson_sampler_errors", "Failed GPU reads by error kind.",
                                 labels=GPU + ["error"])
    unmetered = CounterMetricFamily("wattson_gpu_unmetered_seconds", "Time whose energy could not be known "
                                    "(wattson down across a reboot or driver reload, a GPU without an energy "
                                    "counter unreadable), in seconds; no energy is counted for it.", labels=GPU)
    for g in snap.gpus:
        ident = g.identity
        lv = [str(ident.index), ident.uuid]
        info.add_metric(lv + [ident.name, ident.pci_bus_id, ident.driver_version, g.energy_method, snap.backend], 1)
        up.add_metric(lv, 1 if g.up else 0)
        r = g.reading
        if r is not None:
            # Gauges of a GPU that is down keep their last value only through wattson_gpu_up=0; a stale
            # power reading would lie, so power and utilization are dropped while down.
            if g.up:
                power.add_metric(lv, r.power_watts)
                if r.utilization_ratio is not None:
                    util.add_metric(lv, r.utilization_ratio)
            if r.power_limit_watts is not None:
                limit.add_metric(lv, r.power_limit_watts)
            if r.memory_total_bytes is not None:
                mem_total.add_metric(lv, r.memory_total_bytes)
            if g.up and r.memory_used_bytes is not None:
                mem_used.add_metric(lv, r.memory_used_bytes)
        if g.catching_up:
            continue  # restored totals not yet continued by a reading could be lower than the last exported
        energy.add_metric(lv, g.energy_joules)
        for currency, amount in g.account.cost:
            cost.add_metric(lv + [currency], amount)
        for currency, amount in g.account.credit:
            credit.add_metric(lv + [currency], amount)
        co2e.add_metric(lv, g.account.co2e_grams)
        for signal, joules in g.account.unpriced_joules:
            unpriced.add_metric(lv + [signal], joules)
        unmetered.add_metric(lv, g.unmetered_seconds)
        counts = dict(g.errors)
        for kind in ERROR_KINDS:
            errors.add_metric(lv + [kind], counts.get(kind, 0))
    yield from (info, up, power, limit, energy, mem_used, mem_total, util, cost, credit, co2e, unpriced, unmetered,
                errors)


def _grid_metrics(snap: Snapshot) -> Iterator[Metric]:
    pue = GaugeMetricFamily("wattson_pue", "Power usage effectiveness applied to GPU energy for cost and CO2e.")
    pue.add_metric([], snap.pue)
    yield pue
    intensity = GaugeMetricFamily("wattson_grid_carbon_intensity_grams_per_kwh",
                                  "Grid carbon intensity in force now, gCO2e per kWh. Absent when unknown.",
                                  labels=["zone"])
    price = GaugeMetricFamily("wattson_electricity_price_per_kwh", "Electricity price in force now, currency "
                              "units per kWh, retail adjustments included. Absent when unknown.",
                              labels=["zone", "currency"])
    info = GaugeMetricFamily("wattson_grid_signal_info", "The source serving each grid signal now; always 1. "
                             "via names the chain's source that relayed it (a grid hub: wattson), empty when "
                             "source is in the chain itself.", labels=["signal", "zone", "source", "estimated", "via"])
    age = GaugeMetricFamily("wattson_grid_signal_age_seconds", "Seconds since the data serving the signal "
                            "was fetched.", labels=["signal", "zone"])
    index = GaugeMetricFamily("wattson_grid_signal_source_index", "Position in the configured fallback chain of "
                              "the source serving the signal now: 0 = preferred, more = a fallback.",
                              labels=["signal", "zone"])
    for s in snap.signals:
        if s.value is None:
            continue
        if s.signal == "carbon":
            intensity.add_metric([s.zone], s.value)
        else:
            price.add_metric([s.zone, s.currency or ""], s.value)
        info.add_metric([s.signal, s.zone, s.source or "", "true" if s.estimated else "false", s.via], 1)
        if s.age_seconds is not None:
            age.add_metric([s.signal, s.zone], max(0.0, s.age_seconds))
        if s.source_index is not None:
            index.add_metric([s.signal, s.zone], s.source_index)
    yield from (intensity, price, info, age, index)
    up = GaugeMetricFamily("wattson_source_up", "1 if the last fetch from this grid source succeeded.",
                           labels=["signal", "source"])
    errors = CounterMetricFamily("wattson_source_errors", "Failed or rejected grid source fetches by reason.",
                                 labels=["signal", "source", "reason"])
    last = GaugeMetricFamily("wattson_source_last_success_timestamp_seconds",
                             "UNIX time of the last successful fetch from this grid source.",
                             labels=["signal", "source"])
    for src in snap.sources:
        lv = [src.signal, src.source]
        if src.up is not None:
            up.add_metric(lv, 1 if src.up else 0)
        counts = dict(src.errors)
        for reason in ERROR_REASONS:
            errors.add_metric(lv + [reason], counts.get(reason, 0))
        if src.last_success is not None:
            last.add_metric(lv, src.last_success)
    yield from (up, errors, last)


def _forecast_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Best windows as the sampler computed them (a scrape only formats them); absent, never 0, for a
    window length the serving source's data do not hold."""
    start = GaugeMetricFamily("wattson_grid_best_window_start_timestamp_seconds", "Start (UNIX time) of the "
                              "window of this length with the lowest average of the signal, in the data of the "
                              "source serving it now.", labels=["signal", "zone", "window"])
    intensity = GaugeMetricFamily("wattson_grid_carbon_intensity_best_window_grams_per_kwh", "Average grid "
                                  "carbon intensity over the best window of this length, gCO2e per kWh.",
                                  labels=["zone", "window"])
    price = GaugeMetricFamily("wattson_electricity_price_best_window_per_kwh", "Average electricity price over "
                              "the best window of this length, currency units per kWh, retail adjustments "
                              "included.", labels=["zone", "currency", "window"])
    horizon = GaugeMetricFamily("wattson_grid_forecast_horizon_seconds", "How far ahead the data of the source "
                                "serving the signal reach; absent when not beyond the current interval.",
                                labels=["signal", "zone"])
    for f in snap.forecasts:
        for w in f.windows:
            start.add_metric([f.signal, f.zone, w.label], w.start)
            if f.signal == "carbon":
                intensity.add_metric([f.zone, w.label], w.value)
            else:
                price.add_metric([f.zone, f.currency or "", w.label], w.value)
        ahead = f.horizon_seconds(snap.timestamp if snap.timestamp is not None else f.computed_at)
        if ahead is not None:
            horizon.add_metric([f.signal, f.zone], ahead)
    yield from (start, intensity, price, horizon)


def _budget_metrics(snap: Snapshot) -> Iterator[Metric]:
    yield from budget_metrics(snap.budgets)


PERIOD = ["period", "offset"]


def _period_metrics(snap: Snapshot) -> Iterator[Metric]:
    """This host's totals since the start of the current day and month (gauges: they go back to 0 when a
    period starts), as the sampler computed them."""
    energy = GaugeMetricFamily("wattson_period_energy_joules", "GPU energy (no PUE) of this host since the start "
                               "of the period, in joules.", labels=PERIOD)
    cost = GaugeMetricFamily("wattson_period_cost", "Net money (cost at positive prices minus credit at negative "
                             "prices) for this host's energy (x PUE) since the start of the period, in currency "
                             "units.", labels=PERIOD + ["currency"])
    co2e = GaugeMetricFamily("wattson_period_co2e_grams", "CO2-equivalent for this host's energy (x PUE) since the "
                             "start of the period, in grams.", labels=PERIOD)
    start = GaugeMetricFamily("wattson_period_start_timestamp_seconds", "UNIX time the current period started: "
                              "midnight (day) or the first of the month (month) at the offset.", labels=PERIOD)
    for t in snap.periods:
        lv = [t.period, t.offset]
        energy.add_metric(lv, t.energy_joules)
        for currency, amount in t.cost:
            cost.add_metric(lv + [currency], amount)
        co2e.add_metric(lv, t.co2e_grams)
        start.add_metric(lv, t.start)
    yield from (energy, cost, co2e, start)


def _scope_period_metrics(w: WorkloadSnapshot) -> Iterator[Metric]:
    """Per budget scope value (namespace, account, user), the workloads' totals since the start of the period;
    a value shows in the periods it was charged in."""
    energy = GaugeMetricFamily("wattson_scope_period_energy_joules", "GPU energy (no PUE) of the scope's "
                               "workloads on this host since the start of the period, in joules.")
    cost = GaugeMetricFamily("wattson_scope_period_cost", "Net money for the scope's workloads' energy (x PUE) on "
                             "this host since the start of the period, in currency units.")
    co2e = GaugeMetricFamily("wattson_scope_period_co2e_grams", "CO2-equivalent for the scope's workloads' energy "
                             "(x PUE) on this host since the start of the period, in grams.")
    for s in w.scope_periods:
        t = s.totals
        labels = {"scope": s.scope, s.scope: s.value, "period": t.period, "offset": t.offset}
        energy.add_sample("wattson_scope_period_energy_joules", labels, t.energy_joules)
        for currency, amount in t.cost:
            cost.add_sample("wattson_scope_period_cost", labels | {"currency": currency}, amount)
        co2e.add_sample("wattson_scope_period_co2e_grams", labels, t.co2e_grams)
    yield from (energy, cost, co2e)


def _storage_metrics(st: StorageStatus) -> Iterator[Metric]:
    errors = CounterMetricFamily("wattson_storage_errors", "State file problems: load (unreadable, corrupt, "
                                 "version, foreign: the file was set aside and wattson started from zero) and "
                                 "save (write failed: skipped, retried).", labels=["operation", "reason"])
    counts = {(op, reason): n for op, reason, n in st.errors}
    for op, reasons in (("load", LOAD_REASONS), ("save", SAVE_REASONS)):
        for reason in reasons:
            errors.add_metric([op, reason], counts.get((op, reason), 0))
    yield errors
    if st.last_save is not None:
        last = GaugeMetricFamily("wattson_storage_last_save_timestamp_seconds",
                                 "UNIX time of the last successful write of the state file.")
        last.add_metric([], st.last_save)
        yield last


WORKLOAD = ["kind", "workload", "gpu", "uuid"]


def _workload_metrics(w: WorkloadSnapshot) -> Iterator[Metric]:
    energy = CounterMetricFamily("wattson_workload_energy_joules", "GPU energy (no PUE) attributed to the "
                                 "workload on this GPU, in joules.", labels=WORKLOAD)
    cost = CounterMetricFamily("wattson_workload_cost", "Money paid for the workload's energy (x PUE) on "
                               "this GPU at positive prices. Net = cost - cost_credit.",
                               labels=WORKLOAD + ["currency"])
    credit = CounterMetricFamily("wattson_workload_cost_credit", "Money earned for the workload's energy "
                                 "(x PUE) on this GPU at negative prices, as a positive amount.",
                                 labels=WORKLOAD + ["currency"])
    co2e = CounterMetricFamily("wattson_workload_co2e_grams", "CO2-equivalent attributed to the workload's "
                               "energy (x PUE) on this GPU, in grams.", labels=WORKLOAD)
    info = GaugeMetricFamily("wattson_workload_info", "Workload description; always 1. user is the owner, "
                             "pod and namespace are set where the container runtime names them.",
                             labels=["kind", "workload", "user", "pod", "namespace"])
    methods = GaugeMetricFamily("wattson_workload_attribution_info", "How the GPU's last step was split: "
                                "sm_utilization, memory, equal, mig_memory (GPU-instance memory share), "
                                "pod_allocation (no process seen: the pods the kubelet allocated it to), "
                                "idle or unattributed; always 1.", labels=GPU + ["method"])
    overflow = CounterMetricFamily("wattson_workload_overflow_attributions", "Shares of GPU steps charged to "
                                   "kind=\"overflow\" because max_series workload series existed.", labels=GPU)
    series = GaugeMetricFamily("wattson_workload_series", "Workload series exported now (idle, "
                               "unattributed and overflow excluded), limited by workloads.max_series.")
    for s in w.series:
        lv = [s.kind, s.workload, str(s.gpu), s.uuid]
        energy.add_metric(lv, s.energy_joules)
        for currency, amount in s.cost:
            cost.add_metric(lv + [currency], amount)
        for currency, amount in s.credit:
            credit.add_metric(lv + [currency], amount)
        co2e.add_metric(lv, s.co2e_grams)
    for i in w.info:
        info.add_metric([i.kind, i.workload, i.user, i.pod, i.namespace], 1)
    for g in w.gpus:
        if g.method is not None:
            methods.add_metric([str(g.gpu), g.uuid, g.method], 1)
        overflow.add_metric([str(g.gpu), g.uuid], g.overflowed)
    series.add_metric([], w.workload_series)
    yield from (energy, cost, credit, co2e, info, methods, overflow, series)


def _kubelet_metrics(k: KubeletStatus) -> Iterator[Metric]:
    """Health of the kubelet PodResources source; its failures cost attribution to pods, never GPU metrics."""
    if k.up is not None:
        up = GaugeMetricFamily("wattson_kubelet_podresources_up", "1 if the last List call to the kubelet's "
                               "PodResources API answered and decoded, 0 if it failed.")
        up.add_metric([], 1 if k.up else 0)
        yield up
    errors = CounterMetricFamily("wattson_kubelet_podresources_errors", "Failed calls to the kubelet's "
                                 "PodResources API by reason.", labels=["reason"])
    counts = dict(k.errors)
    for reason in KUBELET_ERROR_REASONS:
        errors.add_metric([reason], counts.get(reason, 0))
    yield errors
    if k.last_success is not None:
        last = GaugeMetricFamily("wattson_kubelet_podresources_last_success_timestamp_seconds",
                                 "UNIX time of the last good List answer from the kubelet.")
        last.add_metric([], k.last_success)
        yield last
    unmapped = GaugeMetricFamily("wattson_kubelet_podresources_unmapped_devices", "GPU device ids the kubelet "
                                 "reports (allocatable or allocated) that match none of this host's GPUs.")
    unmapped.add_metric([], k.unmapped_devices)
    yield unmapped


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is not None:
            yield from snapshot_metrics(self.snapshot)


@dataclass(frozen=True)
class Rendered:
    seq: int
    text: bytes
    gzipped: bytes


class Exposition:
    """Renders the latest snapshot once and serves the cached bytes to every scrape."""

    def __init__(self) -> None:
        self._collector = _SnapshotCollector()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)
        # process_* (CPU, memory, open files, start time), as every exporter has; read at render time.
        ProcessCollector(registry=self._registry)
        self._lock = threading.Lock()
        self._cached: Rendered | None = None

    def render(self, snap: Snapshot) -> Rendered:
        cached = self._cached
        if cached is not None and cached.seq == snap.seq:
            return cached
        with self._lock:  # one renderer per snapshot; other scrapers wait for its result
            cached = self._cached
            if cached is not None and cached.seq == snap.seq:
                return cached
            self._collector.snapshot = snap
            text = generate_latest(self._registry)
            cached = Rendered(snap.seq, text, gzip.compress(text, compresslevel=1))
            self._cached = cached
            return cached
