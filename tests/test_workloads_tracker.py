"""Per-workload totals through the real Sampler and simulated GPUs: conservation (exact), idle and
unattributed buckets, churn, PID reuse, retention, the series cap, thread safety, exposition."""

from __future__ import annotations

import dataclasses
import threading
from fractions import Fraction
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import T0, Clock, ScriptedSource, run_for
from wattson.accounting import StepCharge
from wattson.config import SimJobConfig, WorkloadsConfig, parse_config
from wattson.energy import EnergyStep
from wattson.exposition import Exposition
from wattson.gpu.base import GpuProcess, GpuReading
from wattson.gpu.simulated import SimulatedBackend
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import StaticSource
from wattson.sampler import Sampler
from wattson.workloads.attribution import ExactSum
from wattson.workloads.cgroup import ProcFS, UserNames, WorkloadResolver
from wattson.workloads.tracker import WorkloadTracker, attach

GiB = 1024**3
POD = "abcdef01-2345-6789-abcd-ef0123456789"
FIXTURES = Path(__file__).parent / "fixtures" / "proc"


class Wrapped:
    """A simulated GPU whose process list is edited: extra processes, or none at all (None)."""

    def __init__(self, device, extra: tuple[GpuProcess, ...] | None) -> None:
        self.device = device
        self.identity = device.identity
        self.extra = extra

    def read(self) -> GpuReading:
        r = self.device.read()
        processes = None if self.extra is None else (r.processes or ()) + self.extra
        return dataclasses.replace(r, processes=processes)


class Capture:
    """Stands between the sampler and the tracker: records the exact per-GPU totals the sampler accounted,
    for comparison, and passes every step on."""

    def __init__(self, tracker: WorkloadTracker) -> None:
        self.tracker = tracker
        self.lock = threading.Lock()
        self.energy: dict[int, ExactSum] = {}
        self.cost: dict[tuple[int, str], ExactSum] = {}
        self.credit: dict[tuple[int, str], ExactSum] = {}
        self.grams: dict[int, ExactSum] = {}

    def snapshot(self, now):
        return self.tracker.snapshot(now)

    def on_step(self, gpu, uuid, step, charge, reading) -> None:
        self.tracker.on_step(gpu, uuid, step, charge, reading)
        with self.lock:
            self.energy.setdefault(gpu, ExactSum()).add(step.joules)
            for currency, amount in charge.cost:
                target = self.cost if amount >= 0 else self.credit
                target.setdefault((gpu, currency), ExactSum()).add(abs(amount))
            self.grams.setdefault(gpu, ExactSum()).add(charge.co2e_grams)


def make(clock: Clock, jobs: list[dict] | None, count: int, price_sources=None, pue: float = 1.3,
         wrap: dict[int, tuple[GpuProcess, ...] | None] | None = None, **workloads):
    backend = SimulatedBackend(count, "H100-SXM", ["training", "inference", "training", "idle"], 42, True,
                               clock=clock.time, monotonic=clock.monotonic,
                               jobs=None if jobs is None else [SimJobConfig(**j) for j in jobs])
    price = SignalChain("price", "DE", 7200, price_sources or [StaticSource("price", "DE", 0.30, "EUR")],
                        clock=clock.time)
    carbon = SignalChain("carbon", "DE", 7200, [StaticSource("carbon", "DE", 380.0, None)], clock=clock.time)
    price.poll_due()
    carbon.poll_due()
    sampler = Sampler(backend, grid=GridSignals(pue=pue, carbon=carbon, price=price), clock=clock.time)
    sampler.start_backend()
    for index, extra in (wrap or {}).items():
        sampler.gpus[index].replace_device(Wrapped(sampler.gpus[index].device, extra))
    tracker = attach(sampler, backend, WorkloadsConfig(enabled=True, **workloads))
    capture = Capture(tracker)
    sampler.workloads = capture
    sampler.sample_round()  # baseline readings
    return sampler, tracker, capture


def scrape(sampler) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = Exposition().render(sampler.snapshot).text.decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def series(metrics, name, **match) -> dict[tuple[str, str, str], float]:
    """(gpu, kind, workload) -> value of the matching samples of `name`."""
    return {(lb["gpu"], lb["kind"], lb["workload"]): v for lb, v in metrics.get(name, [])
            if all(lb.get(k) == v2 for k, v2 in match.items())}


def gpu_value(metrics, name, gpu, **match) -> float:
    return next(v for lb, v in metrics[name] if lb["gpu"] == str(gpu) and all(lb.get(k) == x for k, x in match.items()))


SCENARIO = [
    {"kind": "slurm_job", "id": "4242", "gpus": [0], "user": "alice", "uid": 1001, "load": 1.0},
    {"kind": "container", "id": "0123456789ab", "gpus": [0], "user": "bob", "uid": 1002, "load": 0.5},
    {"kind": "pod", "id": POD, "gpus": [1, 2], "pod_name": "trainer-0", "namespace": "research"},
]


def test_conservation_two_jobs_on_one_gpu_one_job_across_two_and_every_bucket():
    """Sum over workloads == GPU totals, exactly, for energy, cost, credit and grams; including idle
    (GPU 3, no job), unknown processes (GPU 2) and a GPU without a process list (GPU 4)."""
    clock = Clock()
    price = ScriptedSource("tariff", "price", [(T0, T0 + 20, 0.30), (T0 + 20, T0 + 40, -0.05),
                                               (T0 + 40, T0 + 3600, 0.2137)], "EUR")
    sampler, tracker, capture = make(
        clock, SCENARIO, 5, price_sources=[price],
        wrap={2: (GpuProcess(999_999, 2 * GiB, 0.1),), 4: None})
    run_for(sampler, clock, 60, 1.3)  # steps straddle the price changes

    totals = tracker.exact_totals()
    for gpu in range(5):
        mine = {k: v for k, v in totals.items() if k[0] == gpu}
        assert sum((v["energy_joules"] for v in mine.values()), Fraction(0)) == capture.energy[gpu].exact
        assert sum((v["co2e_grams"] for v in mine.values()), Fraction(0)) == capture.grams[gpu].exact
        assert sum((v["cost"]["EUR"] for v in mine.values()), Fraction(0)) == capture.cost[(gpu, "EUR")].exact
        assert sum((v["credit"]["EUR"] for v in mine.values()), Fraction(0)) == capture.credit[(gpu, "EUR")].exact

    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert set(energy) == {
        ("0", "slurm_job", "4242"), ("0", "container", "0123456789ab"),
        ("1", "pod", POD), ("2", "pod", POD), ("2", "unattributed", "unknown_process"),
        ("3", "idle", "idle"), ("4", "unattributed", "no_process_list"),
    }
    for gpu in range(5):
        for name, gpu_name, extra in (("wattson_workload_energy_joules_total", "wattson_gpu_energy_joules_total", {}),
                                      ("wattson_workload_co2e_grams_total", "wattson_gpu_co2e_grams_total", {}),
                                      ("wattson_workload_cost_total", "wattson_gpu_cost_total", {"currency": "EUR"}),
                                      ("wattson_workload_cost_credit_total", "wattson_gpu_cost_credit_total",
                                       {"currency": "EUR"})):
            parts = [v for (g, _, _), v in series(m, name, **extra).items() if g == str(gpu)]
            assert sum(parts) == pytest.approx(gpu_value(m, gpu_name, gpu, **extra), rel=1e-12, abs=1e-15)
    # the negative price produced credits, the positive ones costs
    assert series(m, "wattson_workload_cost_credit_total")[("0", "slurm_job", "4242")] > 0
    assert series(m, "wattson_workload_cost_total")[("0", "slurm_job", "4242")] > 0
    # two jobs on GPU 0 split by SM activity: load 1 : 0.5
    ratio = energy[("0", "slurm_job", "4242")] / energy[("0", "container", "0123456789ab")]
    assert ratio == pytest.approx(2.0, rel=0.05)
    methods = {lb["gpu"]: lb["method"] for lb, _ in m["wattson_workload_attribution_info"]}
    assert methods == {"0": "sm_utilization", "1": "sm_utilization", "2": "sm_utilization", "3": "idle",
                       "4": "unattributed"}
    info = {(lb["kind"], lb["workload"]): lb for lb, _ in m["wattson_workload_info"]}
    assert info[("pod", POD)]["namespace"] == "research" and info[("pod", POD)]["pod"] == "trainer-0"
    assert info[("slurm_job", "4242")]["user"] == "alice"
    assert ("idle", "idle") not in info


def test_energy_split_follows_the_gpu_not_the_facility():
    """Workload energy is GPU energy (no PUE), like wattson_gpu_energy_joules_total; cost and grams
    include PUE, like the GPU's."""
    clock = Clock()
    sampler, tracker, capture = make(clock, SCENARIO[:1], 1, pue=2.0)
    run_for(sampler, clock, 10, 1.0)
    m = scrape(sampler)
    assert series(m, "wattson_workload_energy_joules_total")[("0", "slurm_job", "4242")] == pytest.approx(
        gpu_value(m, "wattson_gpu_energy_joules_total", 0), rel=1e-12)
    joules = gpu_value(m, "wattson_gpu_energy_joules_total", 0)
    assert series(m, "wattson_workload_co2e_grams_total")[("0", "slurm_job", "4242")] == pytest.approx(
        joules * 2.0 / 3.6e6 * 380.0, rel=1e-9)


def test_churn_jobs_start_and_end_between_samples_pid_reuse_and_retention():
    clock = Clock()
    jobs = [
        {"kind": "slurm_job", "id": "100", "gpus": [0], "pid": 5000, "end_seconds": 10.5},
        {"kind": "container", "id": "bbbbbbbbbbbb", "gpus": [0], "start_seconds": 5.2},
        # takes over the PID of job 100 as soon as it ended: must get its own identity
        {"kind": "pod", "id": POD, "gpus": [0], "pid": 5000, "start_seconds": 10.5},
        {"kind": "slurm_job", "id": "200", "gpus": [1], "start_seconds": 3.0, "end_seconds": 6.0},
    ]
    sampler, tracker, capture = make(clock, jobs, 2, retention_seconds=20)
    run_for(sampler, clock, 4, 1.0)
    m = scrape(sampler)
    assert set(series(m, "wattson_workload_energy_joules_total")) == {
        ("0", "slurm_job", "100"), ("1", "idle", "idle"), ("1", "slurm_job", "200")}
    run_for(sampler, clock, 9, 1.0)  # t = 13: job 100 ended, its PID now belongs to the pod
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert ("0", "pod", POD) in energy and ("0", "container", "bbbbbbbbbbbb") in energy
    job100, job200 = energy[("0", "slurm_job", "100")], energy[("1", "slurm_job", "200")]
    idle1 = energy[("1", "idle", "idle")]
    run_for(sampler, clock, 10, 1.0)  # t = 23
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert energy[("0", "slurm_job", "100")] == job100  # finished: frozen, still exported
    assert energy[("1", "slurm_job", "200")] == job200  # last charged at t = 5: kept for 20 s
    assert energy[("1", "idle", "idle")] > idle1  # the GPU idles again and keeps counting
    run_for(sampler, clock, 3, 1.0)  # t = 26
    m = scrape(sampler)
    assert ("1", "slurm_job", "200") not in series(m, "wattson_workload_energy_joules_total")
    info = {(lb["kind"], lb["workload"]) for lb, _ in m["wattson_workload_info"]}
    assert ("slurm_job", "200") not in info and ("slurm_job", "100") in info
    run_for(sampler, clock, 5, 1.0)  # t = 31: job 100, last charged at t = 10, expires too
    m = scrape(sampler)
    assert ("0", "slurm_job", "100") not in series(m, "wattson_workload_energy_joules_total")
    assert gauge(m, "wattson_workload_series") == 2  # the container and the pod
    # what is still held for GPU 1 is its idle bucket: less than the GPU's total by job 200's share
    live = sum((v["energy_joules"] for k, v in tracker.exact_totals().items() if k[0] == 1), Fraction(0))
    assert float(capture.energy[1].exact - live) == pytest.approx(job200, rel=1e-12)


def gauge(m, name) -> float:
    return m[name][0][1]


def test_counters_never_decrease_while_exported():
    clock = Clock()
    jobs = [{"kind": "slurm_job", "id": str(i), "gpus": [i % 2], "start_seconds": 2.0 * i,
             "end_seconds": 2.0 * i + 5} for i in range(8)]
    sampler, tracker, _ = make(clock, jobs, 2, retention_seconds=3)
    last: dict[tuple[str, str, str, str], float] = {}
    for _ in range(30):
        run_for(sampler, clock, 1, 1.0)
        m = scrape(sampler)
        for name in ("wattson_workload_energy_joules_total", "wattson_workload_co2e_grams_total",
                     "wattson_workload_cost_total"):
            for (g, k, w), v in series(m, name).items():
                key = (name, g, k, w)
                assert v >= last.get(key, 0.0)
                last[key] = v


def test_series_cap_sends_new_workloads_to_a_counted_overflow_bucket():
    clock = Clock()
    jobs = [{"kind": "slurm_job", "id": "1", "gpus": [0], "end_seconds": 5.5},
            {"kind": "slurm_job", "id": "2", "gpus": [0]},
            {"kind": "slurm_job", "id": "3", "gpus": [0]}]
    sampler, tracker, capture = make(clock, jobs, 1, max_series=2, retention_seconds=2)
    run_for(sampler, clock, 5, 1.0)
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert set(energy) == {("0", "slurm_job", "1"), ("0", "slurm_job", "2"), ("0", "overflow", "overflow")}
    assert gpu_value(m, "wattson_workload_overflow_attributions_total", 0) == 5  # one share per step
    assert gauge(m, "wattson_workload_series") == 2
    assert sum(energy.values()) == pytest.approx(gpu_value(m, "wattson_gpu_energy_joules_total", 0), rel=1e-12)
    # job 1 ends at 5.5 and expires after 2 s: job 3 gets a series of its own; the overflow stays
    run_for(sampler, clock, 5, 1.0)
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert ("0", "slurm_job", "3") in energy and ("0", "slurm_job", "1") not in energy
    assert ("0", "overflow", "overflow") in energy
    overflowed = gpu_value(m, "wattson_workload_overflow_attributions_total", 0)
    run_for(sampler, clock, 3, 1.0)
    assert gpu_value(scrape(sampler), "wattson_workload_overflow_attributions_total", 0) == overflowed
    total = sum(v["energy_joules"] for v in tracker.exact_totals().values())
    assert total < capture.energy[0].exact  # job 1's expired series is no longer held


def test_zero_retention_still_shows_a_finished_workload_once():
    clock = Clock()
    jobs = [{"kind": "slurm_job", "id": "7", "gpus": [0], "end_seconds": 2.5}]
    sampler, _, _ = make(clock, jobs, 1, retention_seconds=0)
    run_for(sampler, clock, 3, 1.0)  # last charged in the round at t = 2
    assert ("0", "slurm_job", "7") in series(scrape(sampler), "wattson_workload_energy_joules_total")
    run_for(sampler, clock, 1, 1.0)
    assert ("0", "slurm_job", "7") not in series(scrape(sampler), "wattson_workload_energy_joules_total")


def test_mig_jobs_are_split_by_gpu_instance_memory_and_say_so():
    clock = Clock()
    jobs = [{"kind": "container", "id": "aaaaaaaaaaaa", "gpus": [0], "mig_instance": 1, "memory_gib": 30},
            {"kind": "container", "id": "cccccccccccc", "gpus": [0], "mig_instance": 2, "memory_gib": 10}]
    sampler, _, _ = make(clock, jobs, 1)
    run_for(sampler, clock, 5, 1.0)
    m = scrape(sampler)
    assert [lb["method"] for lb, _ in m["wattson_workload_attribution_info"]] == ["mig_memory"]
    energy = series(m, "wattson_workload_energy_joules_total")
    assert energy[("0", "container", "aaaaaaaaaaaa")] == pytest.approx(3 * energy[("0", "container", "cccccccccccc")])


def test_without_jobs_the_simulated_backend_reports_no_process_list_and_all_is_unattributed():
    clock = Clock()
    sampler, _, _ = make(clock, None, 2)
    run_for(sampler, clock, 3, 1.0)
    assert set(series(scrape(sampler), "wattson_workload_energy_joules_total")) == {
        ("0", "unattributed", "no_process_list"), ("1", "unattributed", "no_process_list")}


def test_empty_job_list_idles_every_gpu():
    clock = Clock()
    sampler, _, _ = make(clock, [], 2)
    run_for(sampler, clock, 3, 1.0)
    m = scrape(sampler)
    assert set(series(m, "wattson_workload_energy_joules_total")) == {("0", "idle", "idle"), ("1", "idle", "idle")}
    # an idle H100 draws about 70 W
    assert gpu_value(m, "wattson_gpu_energy_joules_total", 0) == pytest.approx(3 * 70.0, rel=0.05)


def test_attribution_failure_keeps_the_step_and_the_gpu(caplog):
    class Broken:
        def read_text(self, pid, name):
            raise RuntimeError("bug")

    tracker = WorkloadTracker(WorkloadResolver(Broken()), 60, 10, clock=lambda: T0)
    reading = GpuReading(T0, 0.0, 100.0, None, None, None, None, None, (GpuProcess(1, 1, 0.5),))
    tracker.on_step(0, "GPU-x", EnergyStep(T0 - 1, T0, 100.0), StepCharge(100.0, (("EUR", 0.01),), 3.0, ()), reading)
    totals = tracker.exact_totals()
    assert list(totals) == [(0, "GPU-x", "unattributed", "error")]
    assert totals[(0, "GPU-x", "unattributed", "error")]["energy_joules"] == 100
    assert "workload attribution failed" in caplog.text


def test_concurrent_steps_and_snapshots_lose_nothing_and_published_snapshots_stay_as_they_were():
    now = [T0]
    resolver = WorkloadResolver(ProcFS(str(FIXTURES)), UserNames(resolve=False))
    tracker = WorkloadTracker(resolver, 3600, 1000, clock=lambda: now[0])
    pids = [1001, 1002, 2002, 3001, 3002, 4001, 999_999]
    steps = 150
    errors: list[BaseException] = []

    def worker(gpu: int) -> None:
        try:
            for i in range(steps):
                procs = tuple(GpuProcess(pid, GiB * (1 + (pid + i) % 5), ((pid * 7 + i) % 100) / 100)
                              for pid in pids[gpu % 3:])
                reading = GpuReading(T0, 0.0, 100.0, None, None, None, None, None, procs)
                tracker.on_step(gpu, f"GPU-{gpu}", EnergyStep(T0, T0 + 1, 0.1 * (i + 1)),
                                StepCharge(0.1, (("EUR", 1e-5 * (i - 100)),), 0.01 * i / 3, ()), reading)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    first = tracker.snapshot(now[0])
    frozen = repr(first)
    renders = []
    stop = threading.Event()

    def render() -> None:
        while not stop.wait(0.002):
            snap = tracker.snapshot(now[0])
            renders.append((snap, repr(snap)))

    threads = [threading.Thread(target=worker, args=(g,)) for g in range(8)]
    renderer = threading.Thread(target=render)
    renderer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    renderer.join()
    assert not errors
    assert repr(first) == frozen
    assert all(repr(snap) == text for snap, text in renders)  # nothing published was changed afterwards
    totals = tracker.exact_totals()
    for gpu in range(8):
        energy = sum((v["energy_joules"] for k, v in totals.items() if k[0] == gpu), Fraction(0))
        assert energy == sum((Fraction(0.1 * (i + 1)) for i in range(steps)), Fraction(0))
        grams = sum((v["co2e_grams"] for k, v in totals.items() if k[0] == gpu), Fraction(0))
        assert grams == sum((Fraction(0.01 * i / 3) for i in range(steps)), Fraction(0))
        net = sum((v["cost"]["EUR"] - v["credit"]["EUR"] for k, v in totals.items() if k[0] == gpu), Fraction(0))
        assert net == sum((Fraction(1e-5 * (i - 100)) for i in range(steps)), Fraction(0))
    assert (0, "GPU-0", "unattributed", "unknown_process") in totals
    assert renders


def test_attach_wires_the_tracker_and_shows_overflow_counters_from_the_start():
    clock = Clock()
    backend = SimulatedBackend(2, "L4", ["idle"], 1, clock=clock.time, monotonic=clock.monotonic)
    sampler = Sampler(backend, clock=clock.time)
    sampler.start_backend()
    tracker = attach(sampler, backend, WorkloadsConfig(enabled=True, proc_root=str(FIXTURES)))
    assert sampler.workloads is tracker
    sampler.sample_round()
    m = scrape(sampler)
    assert sorted(lb["gpu"] for lb, _ in m["wattson_workload_overflow_attributions_total"]) == ["0", "1"]
    assert isinstance(tracker.resolver.proc, ProcFS)


def test_config_keys_and_simulated_jobs_validation():
    cfg = parse_config("workloads: {enabled: true, bare_processes: process, resolve_user_names: false}\n")
    assert cfg.workloads.bare_processes == "process" and cfg.workloads.retention_seconds == 900
    assert cfg.workloads.pod_metadata_files[0].startswith("/run/containerd/")
    from wattson.config import ConfigError

    with pytest.raises(ConfigError, match=r"gpu\.simulated\.jobs\[0\].*not a valid slurm_job id"):
        parse_config("gpu: {simulated: {jobs: [{kind: slurm_job, id: abc, gpus: [0]}]}}\n")
    with pytest.raises(ConfigError, match=r"GPU 7 does not exist"):
        parse_config("gpu: {simulated: {count: 2, jobs: [{kind: process, gpus: [7]}]}}\n")
    with pytest.raises(ConfigError, match=r"workloads\.bare_processes"):
        parse_config("workloads: {bare_processes: job}\n")
