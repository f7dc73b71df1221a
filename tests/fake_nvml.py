"""A fake NVML driver for tests, installed by replacing pynvml's module functions.

It raises pynvml's own error classes, so code under test sees exactly what it would see from a real
driver. Each FakeGpu's energy counter is the exact integral of its power profile (closed form), so a
test can predict every joule. Time is the FakeClock's monotonic seconds.

    clock = FakeClock()
    gpu = FakeGpu(0, power=square_wave(600, 2, 100, 1))
    driver = FakeDriver(clock, [gpu]).install(monkeypatch)
    backend = NvmlBackend(clock=clock.time, monotonic=clock.monotonic)  # collect_processes=True for workloads

Anything in pynvml that is not faked here fails the test loudly instead of reaching a real library.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

EPOCH = 1_790_000_000.0  # FakeClock's wall-clock start: 2026-09-21T14:13:20Z
MONOTONIC_START = 1000.0  # monotonic clocks start anywhere; not 0, to catch code that assumes 0
GiB = 1024**3
MiB = 1024**2

ErrorSpec = type[Exception] | int | Exception


def make_error(spec: ErrorSpec) -> Exception:
    """An exception from an NVMLError subclass, an NVML return code, or a ready exception instance."""
    if isinstance(spec, Exception):
        return spec
    if isinstance(spec, int):
        return pynvml.NVMLError(spec)
    return spec()


class FakeClock:
    """A clock that only moves when told to; time() and monotonic() move together."""

    def __init__(self, start: float = EPOCH, monotonic_start: float = MONOTONIC_START) -> None:
        self._wall = start
        self._mono = monotonic_start
        self._lock = threading.Lock()

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("FakeClock only moves forward")
        with self._lock:
            self._wall += seconds
            self._mono += seconds


class Constant:
    """Constant power draw in watts."""

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def __call__(self, t: float) -> float:
        return self.watts

    def integral(self, t0: float, t1: float) -> float:
        """Energy in joules drawn in [t0, t1]."""
        return self.watts * (t1 - t0)


class SquareWave:
    """`high_w` for `high_s` seconds, then `low_w` for `low_s` seconds, repeating from `origin`."""

    def __init__(self, high_w: float, high_s: float, low_w: float, low_s: float, origin: float = 0.0) -> None:
        if high_s <= 0 or low_s <= 0:
            raise ValueError("square wave phases must be longer than 0 s")
        self.high_w, self.high_s, self.low_w, self.low_s, self.origin = high_w, high_s, low_w, low_s, origin
        self.period_s = high_s + low_s

    def __call__(self, t: float) -> float:
        return self.high_w if (t - self.origin) % self.period_s < self.high_s else self.low_w

    def _cumulative(self, t: float) -> float:
        """Joules from `origin` to t (negative before origin, by the same periodic law)."""
        x = t - self.origin
        periods = math.floor(x / self.period_s)
        rest = x - periods * self.period_s
        per_period = self.high_w * self.high_s + self.low_w * self.low_s
        return (periods * per_period + min(rest, self.high_s) * self.high_w
                + max(0.0, rest - self.high_s) * self.low_w)

    def integral(self, t0: float, t1: float) -> float:
        return self._cumulative(t1) - self._cumulative(t0)


def constant(watts: float) -> Constant:
    return Constant(watts)


def square_wave(high_w: float, high_s: float, low_w: float, low_s: float, origin: float = 0.0) -> SquareWave:
    return SquareWave(high_w, high_s, low_w, low_s, origin)


@dataclass
class _Failure:
    error: ErrorSpec
    remaining: int
    function: str | None


class FakeGpu:
    """One fake GPU: power is `power(t)`, the counter `energy_start_mj` + the exact integral since t=0.

    Fault knobs, all changeable while a test runs:
      lost             every call raises GpuIsLost (also nvmlDeviceGetHandleByIndex, as on a real driver)
      energy_supported False: the counter raises NotSupported (a pre-Volta GPU)
      power_supported  False: nvmlDeviceGetPowerUsage raises NotSupported
      reset_counter()  the counter restarts at 0 from now (a driver reload)
      hang()           calls block until the returned event is set; after `hang_timeout_s` they give up
                       with Timeout, so a broken test cannot block forever
      fail_next(e, n)  the next n calls (of `function`, or any) raise e
      processes        compute processes as (pid, used memory bytes or None); None: listing is NotSupported
      process_sm       pid -> SM utilization percent, one sample per call stamped now; None: NotFound
    """

    def __init__(self, index: int, uuid: str | None = None, name: str = "NVIDIA H100 80GB HBM3",
                 power: Callable[[float], float] | None = None, *,
                 energy_supported: bool = True, energy_start_mj: int = 1_234_567_000,
                 power_supported: bool = True, power_limit_watts: float | None = 700.0,
                 memory_total: int = 80 * GiB, memory_used: int = 10 * GiB, memory_reserved: int = 512 * MiB,
                 memory_v2_supported: bool = True, memory_v2_error: ErrorSpec | None = None,
                 utilization: float | Callable[[float], float] | None = 0.5,
                 mig_mode: bool | None = False, pci_bus_id: str | None = None,
                 processes: list[tuple[int, int | None]] | None = None, process_sm: dict[int, int] | None = None,
                 hang_timeout_s: float = 5.0) -> None:
        self.index = index
        self.uuid = uuid or f"GPU-{index:08x}-fa6e-4000-8000-{index:012x}"
        self.name = name
        self.power = power if power is not None else Constant(300.0)
        self.energy_supported = energy_supported
        self.power_supported = power_supported
        self.power_limit_watts = power_limit_watts
        self.memory_total = memory_total
        self.memory_used = memory_used
        self.memory_reserved = memory_reserved
        self.memory_v2_supported = memory_v2_supported
        # What an old driver answers to the v2 memory call: no such symbol in the library.
        self.memory_v2_error: ErrorSpec = memory_v2_error or pynvml.NVMLError_FunctionNotFound
        self.utilization = utilization
        self.mig_mode = mig_mode
        self.processes = processes
        self.process_sm = process_sm
        self.pci_bus_id = pci_bus_id or f"00000000:{0x18 + index * 0x10 & 0xFF:02X}:00.0"
        self.hang_timeout_s = hang_timeout_s
        self.lost = False
        self.hang_until: threading.Event | None = None
        self.calls: list[str] = []  # every NVML function called on this GPU, in order
        self._counter_origin = 0.0
        self._counter_base_mj = energy_start_mj
        self._failures: list[_Failure] = []
        self._clock: FakeClock | None = None
        self._lock = threading.Lock()

    # --- knobs ------------------------------------------------------------------------------------
    def fail_next(self, error: ErrorSpec, n: int = 1, function: str | None = None) -> None:
        """Make the next `n` calls (only those of `function`, if given) raise `error`."""
        with self._lock:
            self._failures.append(_Failure(error, n, function))

    def reset_counter(self) -> None:
        """The energy counter restarts at 0 from the current time, as after a driver reload."""
        self._counter_origin = self._now()
        self._counter_base_mj = 0

    def hang(self) -> threading.Event:
        """Make calls block from now on until the returned event is set."""
        self.hang_until = threading.Event()
        return self.hang_until

    def release(self) -> None:
        if self.hang_until is not None:
            self.hang_until.set()
        self.hang_until = None

    # --- what the driver reports ------------------------------------------------------------------
    def _now(self) -> float:
        if self._clock is None:
            raise RuntimeError(f"FakeGpu {self.index} is not attached to a FakeDriver (it has no clock)")
        return self._clock.monotonic()

    def power_watts(self, t: float | None = None) -> float:
        return float(self.power(self._now() if t is None else t))

    def energy_mj(self, t: float | None = None) -> int:
        """The counter at monotonic time t (default now): base + exact integral of the profile, in mJ."""
        t = self._now() if t is None else t
        integral = getattr(self.power, "integral", None)
        if integral is None:
            raise TypeError("FakeGpu power profiles need an integral(t0, t1) method for the energy counter")
        return self._counter_base_mj + round(integral(self._counter_origin, t) * 1000.0)

    def _enter(self, function: str) -> None:
        """Record the call and apply this GPU's faults, in the order a real driver would hit them."""
        self.calls.append(function)
        event = self.hang_until
        if event is not None and not event.wait(self.hang_timeout_s):
            raise pynvml.NVMLError_Timeout()
        if self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        with self._lock:
            for failure in self._failures:
                if failure.function is None or failure.function == function:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    raise make_error(failure.error)


@dataclass(frozen=True)
class FakeHandle:
    """What nvmlDeviceGetHandleByIndex returns: only valid within one init generation of the driver."""

    gpu: FakeGpu
    generation: int


@dataclass
class FakeDriver:
    """The driver: init/shutdown reference count, enumeration, and driver-wide faults.

      init_failures    the next N nvmlInit calls raise `init_error` (default DriverNotLoaded), then it works
      library_missing  nvmlInit raises LibraryNotFound, as pynvml does when it cannot load libnvidia-ml.so.1
      gone             the driver was unloaded: nvmlInit raises DriverNotLoaded and every other call raises
                       `gone_error`, until cleared; handles from before are invalid afterwards
      bytes_strings    return bytes instead of str for names and ids, as older pynvml versions did
    GPUs are enumerated in list order (NVML index = position in `gpus`); remove one to make it vanish.
    """

    clock: FakeClock
    gpus: list[FakeGpu]
    driver_version: str = "550.54.15"
    init_failures: int = 0
    init_error: ErrorSpec = field(default_factory=lambda: pynvml.NVMLError_DriverNotLoaded)
    library_missing: bool = False
    gone: bool = False
    gone_error: ErrorSpec = field(default_factory=lambda: pynvml.NVMLError_DriverNotLoaded)
    bytes_strings: bool = False
    refcount: int = 0
    generation: int = 0
    init_calls: int = 0
    shutdown_calls: int = 0
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for gpu in self.gpus:
            gpu._clock = self.clock

    def add_gpu(self, gpu: FakeGpu) -> None:
        gpu._clock = self.clock
        self.gpus.append(gpu)

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.bytes_strings else text

    # --- driver-wide calls ------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        self.calls.append("nvmlInit")
        if self.library_missing:
            raise pynvml.NVMLError_LibraryNotFound()
        if self.gone:
            raise pynvml.NVMLError_DriverNotLoaded()
        if self.init_failures > 0:
            self.init_failures -= 1
            raise make_error(self.init_error)
        if self.refcount == 0:
            self.generation += 1  # a fresh initialisation hands out new handles
        self.refcount += 1

    def nvmlInitWithFlags(self, flags: int = 0) -> None:
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.calls.append("nvmlShutdown")
        if self.library_missing or self.refcount == 0:
            raise pynvml.NVMLError_Uninitialized()
        if self.gone:
            self.refcount = 0  # the driver took all state with it
            raise make_error(self.gone_error)
        self.refcount -= 1

    def _system(self, function: str) -> None:
        self.calls.append(function)
        if self.library_missing or self.refcount == 0:
            raise pynvml.NVMLError_Uninitialized()
        if self.gone:
            raise make_error(self.gone_error)

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._system("nvmlSystemGetDriverVersion")
        return self._s(self.driver_version)

    def nvmlDeviceGetCount(self) -> int:
        self._system("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._system("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        gpu = self.gpus[index]
        gpu._enter("nvmlDeviceGetHandleByIndex")
        return FakeHandle(gpu, self.generation)

    def nvmlErrorString(self, result: int) -> str:
        known = pynvml.NVMLError._errcode_to_string.get(result)
        if known:
            return known
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_") and getattr(pynvml, name) == result:
                return name[len("NVML_ERROR_"):].replace("_", " ").capitalize()
        return "Unknown Error"

    # --- per-device calls -------------------------------------------------------------------------
    def _device(self, function: str, handle: Any) -> FakeGpu:
        self._system(function)
        if not isinstance(handle, FakeHandle):
            raise pynvml.NVMLError_InvalidArgument()
        if handle.generation != self.generation:
            raise pynvml.NVMLError_Uninitialized()  # a handle from before the last re-initialisation
        if handle.gpu not in self.gpus:
            raise pynvml.NVMLError_GpuIsLost()
        handle.gpu._enter(function)
        return handle.gpu

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        return self._s(self._device("nvmlDeviceGetUUID", handle).uuid)

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self._s(self._device("nvmlDeviceGetName", handle).name)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> SimpleNamespace:
        gpu = self._device("nvmlDeviceGetPciInfo", handle)
        domain, bus, dev = gpu.pci_bus_id.split(":")
        return SimpleNamespace(busId=self._s(gpu.pci_bus_id), busIdLegacy=self._s(gpu.pci_bus_id[4:]),
                               domain=int(domain, 16), bus=int(bus, 16), device=int(dev.split(".")[0], 16),
                               pciDeviceId=0x233010DE, pciSubSystemId=0x16C110DE)

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._device("nvmlDeviceGetMigMode", handle)
        if gpu.mig_mode is None:
            raise pynvml.NVMLError_NotSupported()
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_mode else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetPowerUsage", handle)
        if not gpu.power_supported:
            raise pynvml.NVMLError_NotSupported()
        return round(gpu.power_watts() * 1000.0)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetTotalEnergyConsumption", handle)
        if not gpu.energy_supported:
            raise pynvml.NVMLError_NotSupported()
        return gpu.energy_mj()

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetEnforcedPowerLimit", handle)
        if gpu.power_limit_watts is None:
            raise pynvml.NVMLError_NotSupported()
        return round(gpu.power_limit_watts * 1000.0)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> SimpleNamespace:
        function = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        gpu = self._device(function, handle)
        used, reserved, total = gpu.memory_used, gpu.memory_reserved, gpu.memory_total
        if not version:  # v1 counts driver-reserved memory as used
            return SimpleNamespace(total=total, free=total - used - reserved, used=used + reserved)
        if not gpu.memory_v2_supported:
            raise make_error(gpu.memory_v2_error)
        if version != pynvml.nvmlMemory_v2:
            raise pynvml.NVMLError_ArgumentVersionMismatch()
        return SimpleNamespace(version=version, total=total, reserved=reserved, free=total - used - reserved,
                               used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> SimpleNamespace:
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        util = gpu.utilization
        if util is None:
            raise pynvml.NVMLError_NotSupported()
        ratio = util(self.clock.monotonic()) if callable(util) else util
        return SimpleNamespace(gpu=round(ratio * 100), memory=round(ratio * 40))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        gpu = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        if gpu.processes is None:
            raise pynvml.NVMLError_NotSupported()
        not_mig = 0xFFFFFFFF
        return [SimpleNamespace(pid=pid, usedGpuMemory=memory, gpuInstanceId=not_mig, computeInstanceId=not_mig)
                for pid, memory in gpu.processes]

    def nvmlDeviceGetProcessUtilization(self, handle: Any, since_us: int) -> list[Any]:
        gpu = self._device("nvmlDeviceGetProcessUtilization", handle)
        now_us = round(self.clock.monotonic() * 1e6)
        if gpu.process_sm is None or now_us <= since_us:
            raise pynvml.NVMLError_NotFound()
        return [pynvml.c_nvmlProcessUtilizationSample_t(pid, now_us, sm, 0, 0, 0)
                for pid, sm in gpu.process_sm.items()]

    # --- installation -----------------------------------------------------------------------------
    FAKED = ("nvmlInit", "nvmlInitWithFlags", "nvmlShutdown", "nvmlErrorString", "nvmlSystemGetDriverVersion",
             "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
             "nvmlDeviceGetPciInfo", "nvmlDeviceGetMigMode", "nvmlDeviceGetPowerUsage",
             "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetEnforcedPowerLimit",
             "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetComputeRunningProcesses",
             "nvmlDeviceGetProcessUtilization")

    def install(self, monkeypatch: Any) -> FakeDriver:
        """Replace pynvml's functions with this driver's (undone by monkeypatch at test end)."""
        for name in self.FAKED:
            monkeypatch.setattr(pynvml, name, getattr(self, name))

        def not_faked(name: str) -> Any:
            raise AssertionError(f"fake NVML: pynvml function {name} is not faked; "
                                 "add it to tests/fake_nvml.py")

        # Everything else in pynvml goes through this lookup: never let a test reach a real libnvidia-ml.
        monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", not_faked)
        return self
