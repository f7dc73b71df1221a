"""The small interface every GPU backend implements.

A backend knows how to find GPUs and read one GPU once. It knows nothing about
intervals, energy accounting, threads or Prometheus: the sampler does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Bounded set of error kinds, used as the `error` label of wattson_sampler_errors_total.
ERROR_KINDS = (
    "gpu_lost",
    "not_supported",
    "timeout",
    "driver_not_loaded",
    "uninitialized",
    "unknown",
    "hung",
    "counter_reset",
)


class BackendUnavailable(Exception):
    """The backend cannot start at all (no library, no driver). Message is one line, says why and what to do."""


class GpuReadError(Exception):
    """Reading one GPU failed. `kind` is one of ERROR_KINDS (anything else becomes "unknown"); `reinit`
    asks the sampler to re-initialise the whole backend, since the driver, not just this GPU, went away."""

    def __init__(self, kind: str, message: str, *, reinit: bool = False) -> None:
        super().__init__(message)
        self.kind = kind if kind in ERROR_KINDS else "unknown"
        self.reinit = reinit


@dataclass(frozen=True)
class GpuIdentity:
    """What identifies a physical GPU; constant while the backend lives."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    driver_version: str
    mig_enabled: bool = False


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU, for per-workload attribution (only read when workloads are enabled)."""

    pid: int
    used_memory_bytes: int | None = None
    sm_utilization: float | None = None  # 0..1 over the last sample period, where NVML gives it
    gpu_instance_id: int | None = None  # MIG GPU instance, None without MIG


@dataclass(frozen=True)
class GpuReading:
    """One read of one GPU. Optional fields are None when the device does not report them."""

    timestamp: float  # time.time() when read
    monotonic: float  # time.monotonic() when read, used for integration
    power_watts: float
    energy_millijoules: int | None  # NVML total energy counter since driver load; None = not supported
    power_limit_watts: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_ratio: float | None
    # Running compute processes; None when not collected (workloads disabled) or not supported.
    processes: tuple[GpuProcess, ...] | None = None


class GpuDevice(Protocol):
    identity: GpuIdentity

    def read(self) -> GpuReading:
        """Read the GPU now. Raises GpuReadError. May block (a hung driver call); the caller guards it."""
        ...


class GpuBackend(Protocol):
    name: str  # "nvml" | "simulated" -> the `backend` label
    simulated: bool
    # Names the lifetime of the GPUs' energy counters (boot and driver); set by start() and restart(). A
    # counter read under another epoch cannot be compared with one read now.
    counter_epoch: str

    def start(self) -> list[GpuDevice]:
        """Initialise and enumerate GPUs. Raises BackendUnavailable with a one-line reason."""
        ...

    def restart(self) -> list[GpuDevice]:
        """Re-initialise after the driver went away. Raises BackendUnavailable while it is still away."""
        ...

    def close(self) -> None: ...
