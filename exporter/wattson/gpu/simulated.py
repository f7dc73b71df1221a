"""Simulated GPUs for demos and tests: realistic, deterministic-by-seed load profiles.

Only used when asked for (`--simulate` or `gpu.backend: simulated`), and always labelled
`backend="simulated"`. Power is piecewise constant on a 10 ms grid, so the simulated energy
counter is the exact integral of the simulated power, like a real NVML counter.

Optionally, simulated jobs (Slurm jobs, containers, pods, bare processes) run on the GPUs: their
processes are reported like NVML's compute process list. Their /proc view is per-workload accounting's
business (wattson.workloads.simulated_proc), built from the backend's `jobs`, `origin` and `monotonic`.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import GpuDevice, GpuIdentity, GpuProcess, GpuReading

# Resolution of the simulated power signal. Each read integrates every slot since the last one, so the
# slot length sets the simulator's own cost: 100 ms keeps 1,024 simulated GPUs well inside a round.
SLOT_SECONDS = 0.1


@dataclass(frozen=True)
class GpuModel:
    name: str
    idle_watts: float
    tdp_watts: float
    memory_bytes: int


GiB = 1024**3
MODELS: dict[str, GpuModel] = {
    "H100-SXM": GpuModel("NVIDIA H100 80GB HBM3", 70.0, 700.0, 80 * GiB),
    "H100-PCIE": GpuModel("NVIDIA H100 PCIe", 50.0, 350.0, 80 * GiB),
    "A100-SXM": GpuModel("NVIDIA A100-SXM4-80GB", 55.0, 400.0, 80 * GiB),
    "L4": GpuModel("NVIDIA L4", 16.0, 72.0, 24 * GiB),
    "L40S": GpuModel("NVIDIA L40S", 35.0, 350.0, 48 * GiB),
    "V100": GpuModel("Tesla V100-SXM2-32GB", 40.0, 300.0, 32 * GiB),
    "T4": GpuModel("Tesla T4", 10.0, 70.0, 16 * GiB),
}


def _hash01(*parts: int) -> float:
    """Deterministic pseudo-random number in [0, 1) from integers (splitmix64 finaliser)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return (x >> 11) / float(1 << 53)


def profile_power(profile: str, model: GpuModel, seed: int, gpu: int, slot: int) -> tuple[float, float]:
    """(watts, utilization ratio) of one GPU during one slot of SLOT_SECONDS."""
    t = slot * SLOT_SECONDS
    noise = _hash01(seed, gpu, slot) - 0.5
    span = model.tdp_watts - model.idle_watts
    if profile == "training":
        # Steps of 2 s compute at ~88% TDP and 0.5 s data loading / sync at ~35%, with an eval dip
        # every 5 minutes; phase shifted per GPU so a fleet does not move in lock-step.
        phase = (t + 0.37 * gpu) % 2.5
        if (t + 7 * gpu) % 300.0 < 20.0:
            level = 0.30
        else:
            level = 0.88 if phase < 2.0 else 0.35
        util = 0.97 if level > 0.8 else 0.40
        watts = model.idle_watts + span * level + span * 0.04 * noise
    elif profile == "inference":
        # Requests arrive in bursts: each 200 ms window is busy with a probability that itself
        # drifts slowly (diurnal-like), a busy window runs at 55-95% TDP.
        window = slot // round(0.2 / SLOT_SECONDS)
        busy_p = 0.35 + 0.25 * math.sin(2 * math.pi * t / 600.0 + gpu)
        if _hash01(seed, gpu, window, 7) < busy_p:
            level = 0.55 + 0.40 * _hash01(seed, gpu, window, 11)
            util = 0.6 + 0.4 * level
        else:
            level, util = 0.08, 0.05
        watts = model.idle_watts + span * level + span * 0.02 * noise
    else:  # idle
        watts = model.idle_watts * (1.0 + 0.05 * noise)
        util = 0.0
    return max(0.0, watts), min(1.0, max(0.0, util))


@dataclass(frozen=True)
class SimJob:
    """A simulated workload with one process per GPU it runs on; times are seconds after start."""

    kind: str  # slurm_job | container | pod | process
    id: str
    gpus: tuple[int, ...]
    user: str
    uid: int
    load: float
    memory_bytes: int | None
    start_seconds: float
    end_seconds: float | None
    first_pid: int
    start_ticks: int  # /proc/<pid>/stat field 22; distinct per job so PID reuse is visible
    pod_name: str | None = None
    namespace: str | None = None
    mig_instance: int | None = None

    def active(self, t: float) -> bool:
        return self.start_seconds <= t and (self.end_seconds is None or t < self.end_seconds)

    def pid_on(self, gpu: int) -> int:
        return self.first_pid + self.gpus.index(gpu)

    @property
    def container_id(self) -> str:
        """The full 64-hex id of the job's container (containers and pods), derived from its id."""
        if self.kind == "container":
            return self.id + hashlib.sha256(self.id.encode()).hexdigest()[:64 - len(self.id)]
        if self.kind == "pod":
            return hashlib.sha256(("pod/" + self.id).encode()).hexdigest()
        return ""

    def cgroup(self, rank: int) -> str:
        """The cgroup v2 file a real process of this kind has (systemd cgroup driver)."""
        if self.kind == "slurm_job":
            return f"0::/system.slice/slurmstepd.scope/job_{self.id}/step_0/user/task_{rank}\n"
        if self.kind == "container":
            return f"0::/system.slice/docker-{self.container_id}.scope\n"
        if self.kind == "pod":
            return ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                    f"{self.id.replace('-', '_')}.slice/cri-containerd-{self.container_id}.scope\n")
        return f"0::/user.slice/user-{self.uid}.slice/session-{self.start_ticks % 1000}.scope\n"


def build_jobs(jobs: Sequence[Any]) -> tuple[SimJob, ...]:
    """SimJob from config objects (gpu.simulated.jobs entries)."""
    out = []
    for i, j in enumerate(jobs):
        out.append(SimJob(
            kind=j.kind, id=j.id, gpus=tuple(j.gpus), user=j.user, uid=j.uid, load=j.load,
            memory_bytes=None if j.memory_gib is None else int(j.memory_gib * GiB),
            start_seconds=j.start_seconds, end_seconds=j.end_seconds,
            first_pid=j.pid if j.pid is not None else 20000 + 100 * i,
            start_ticks=1_000_000 + int(j.start_seconds * 100) * 64 + i,
            pod_name=j.pod_name, namespace=j.namespace, mig_instance=j.mig_instance,
        ))
    return tuple(out)


class SimulatedGpu:
    """One simulated GPU whose counter integrates its own piecewise-constant power exactly."""

    def __init__(self, index: int, model: GpuModel, profile: str, seed: int, energy_counter: bool,
                 clock: Callable[[], float], monotonic: Callable[[], float],
                 jobs: tuple[SimJob, ...] | None = None, origin: float | None = None) -> None:
        self.identity = GpuIdentity(
            index=index,
            uuid="GPU-" + str(uuid.UUID(int=int(_hash01(seed, index, 1) * 2**53) << 75
                                       | int(_hash01(seed, index, 3) * 2**53) << 22, version=4)),
            name=model.name,
            pci_bus_id=f"00000000:{0x18 + index * 0x10 & 0xFF:02X}:00.0",
            driver_version="simulated",
        )
        self.model = model
        self.profile = profile
        self.seed = seed
        self.energy_counter = energy_counter
        self._clock = clock
        self._monotonic = monotonic
        self._origin = monotonic() if origin is None else origin
        self._slot = 0
        # With jobs configured, the GPU runs its profile while a job is on it and idles otherwise.
        self.jobs = None if jobs is None else tuple(j for j in jobs if index in j.gpus)
        # Counters on real GPUs count from driver load, not from zero when we start.
        self._energy_mj = float(int(_hash01(seed, index, 2) * 5e9))
        self._lock = threading.Lock()
        self._memory_fraction = {"training": 0.86, "inference": 0.42, "idle": 0.006}.get(profile, 0.1)

    def _profile_at(self, slot: int) -> str:
        if self.jobs is None:
            return self.profile
        t = slot * SLOT_SECONDS
        return self.profile if any(j.active(t) for j in self.jobs) else "idle"

    def _power(self, slot: int) -> tuple[float, float]:
        return profile_power(self._profile_at(slot), self.model, self.seed, self.identity.index, slot)

    def _advance(self, now_mono: float) -> tuple[float, float]:
        target = int((now_mono - self._origin) / SLOT_SECONDS)
        watts, util = self._power(self._slot)
        while self._slot < target:
            self._energy_mj += watts * SLOT_SECONDS * 1000.0
            self._slot += 1
            watts, util = self._power(self._slot)
        return watts, util

    def _processes(self, t: float, util: float, mem_used: int) -> tuple[GpuProcess, ...] | None:
        """NVML-like compute processes: SM utilization in whole percent split by load (None under
        MIG, like NVML), memory as configured or the used memory split by load."""
        if self.jobs is None:
            return None
        active = [j for j in self.jobs if j.active(t)]
        total_load = sum(j.load for j in active)
        procs = []
        for j in active:
            share = j.load / total_load
            sm = None if j.mig_instance is not None else round(util * share * 100) / 100
            memory = j.memory_bytes if j.memory_bytes is not None else int(mem_used * share)
            procs.append(GpuProcess(j.pid_on(self.identity.index), memory, sm, j.mig_instance))
        return tuple(sorted(procs, key=lambda p: p.pid))

    def read(self) -> GpuReading:
        with self._lock:
            mono = self._monotonic()
            watts, util = self._advance(mono)
            mem_total = self.model.memory_bytes
            mem_used = int(mem_total * self._memory_fraction * (1.0 + 0.02 * (util - 0.5)))
            return GpuReading(
                timestamp=self._clock(),
                monotonic=mono,
                power_watts=round(watts, 3),
                energy_millijoules=int(self._energy_mj) if self.energy_counter else None,
                power_limit_watts=self.model.tdp_watts,
                memory_used_bytes=mem_used,
                memory_total_bytes=mem_total,
                utilization_ratio=round(util, 2),
                processes=self._processes(mono - self._origin, util, mem_used),
            )


class SimulatedBackend:
    """Simulated GPUs; with `jobs` (even empty) they report compute processes, without (None) they do not."""

    name = "simulated"
    simulated = True

    def __init__(self, count: int, model: str, profiles: list[str], seed: int, energy_counter: bool = True,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 jobs: Sequence[Any] | None = None) -> None:
        self._args = (count, MODELS[model], profiles, seed, energy_counter)
        self._clock = clock
        self.monotonic = monotonic
        self._devices: list[GpuDevice] = []
        # The simulated jobs, None when none are configured (then no process list is reported). Public so
        # a simulated /proc can serve the jobs' processes.
        self.jobs: tuple[SimJob, ...] | None = None if jobs is None else build_jobs(jobs)
        # monotonic() at start(): job times (start_seconds, end_seconds) count from here. None before start().
        self.origin: float | None = None
        self.counter_epoch = ""

    def start(self) -> list[GpuDevice]:
        count, model, profiles, seed, energy_counter = self._args
        origin = self.origin = self.monotonic()
        # The simulated counters start afresh with every process: a previous run's reading never carries over.
        self.counter_epoch = f"simulated:{uuid.uuid4()}"
        self._devices = [
            SimulatedGpu(i, model, profiles[i % len(profiles)], seed, energy_counter, self._clock, self.monotonic,
                         self.jobs, origin)
            for i in range(count)
        ]
        return list(self._devices)

    def restart(self) -> list[GpuDevice]:
        return list(self._devices)

    def close(self) -> None:
        pass
