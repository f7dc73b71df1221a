"""The real GPU backend: NVIDIA's NVML through pynvml (package nvidia-ml-py).

Every pynvml function is looked up as a module attribute at call time (`pynvml.nvmlDeviceGetPowerUsage`),
so tests can replace them with a fake driver. The energy counter (Volta and newer) is the primary
measurement; power is always read too, so the sampler can integrate it on GPUs without a counter.
Optional metrics that a GPU does not support are probed once and then no longer asked for.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pynvml

from ..logfmt import kv
from .base import BackendUnavailable, GpuDevice, GpuIdentity, GpuReadError, GpuReading
from .nvml_processes import SERIOUS_ERRORS, read_processes

log = logging.getLogger("wattson.gpu.nvml")

# The GPU or metric cannot answer this at all: stop asking (until the next re-initialisation).
_UNSUPPORTED = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                          pynvml.NVML_ERROR_NO_PERMISSION})
# The memory v2 struct is not understood by this driver: use the v1 struct.
_MEMORY_V2_FALLBACK = _UNSUPPORTED | {pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH, pynvml.NVML_ERROR_INVALID_ARGUMENT}
# While opening GPUs: the driver itself went away, so no other GPU can be opened either.
_DRIVER_GONE = frozenset({pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_UNINITIALIZED,
                          pynvml.NVML_ERROR_LIBRARY_NOT_FOUND})

# NVML code -> (error kind, ask the sampler to re-initialise NVML)
_KINDS: dict[int, tuple[str, bool]] = {
    pynvml.NVML_ERROR_GPU_IS_LOST: ("gpu_lost", False),
    pynvml.NVML_ERROR_RESET_REQUIRED: ("gpu_lost", False),  # unusable until reset, operationally the same as lost
    pynvml.NVML_ERROR_NOT_SUPPORTED: ("not_supported", False),
    pynvml.NVML_ERROR_TIMEOUT: ("timeout", False),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: ("driver_not_loaded", True),
    pynvml.NVML_ERROR_UNINITIALIZED: ("uninitialized", True),
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: ("driver_not_loaded", True),
}

_SIMULATE_HINT = "run with --simulate to use simulated GPUs"


def _code(exc: BaseException) -> int | None:
    """The NVML return code carried by a pynvml.NVMLError (None for anything else)."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _describe(exc: BaseException) -> str:
    """One-line text of an NVML error ("GPU is lost"), never raising."""
    try:
        text = str(exc)
    except Exception:  # pynvml may call into the library to describe an unknown code
        text = ""
    text = " ".join(text.split())
    code = _code(exc)
    if not text:
        return f"NVML error {code}" if code is not None else type(exc).__name__
    return text


def _text(value: Any) -> str:
    """pynvml returns str or bytes depending on its version and on the function; NUL-terminated either way."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(value).split("\0", 1)[0].strip()


def _unavailable(where: str, exc: BaseException) -> BackendUnavailable:
    """Translate a failure to initialise or enumerate into a one-line reason with what to do."""
    code = _code(exc)
    what = f"{where}: {_describe(exc)}"
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        msg = f"NVML library libnvidia-ml.so.1 not found: no NVIDIA driver on this host; {_SIMULATE_HINT}"
    elif code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        msg = f"NVIDIA kernel driver is not loaded ({what}): load the nvidia module, or {_SIMULATE_HINT}"
    elif code == pynvml.NVML_ERROR_NO_PERMISSION:
        msg = (f"no permission to use the NVIDIA driver ({what}): give wattson access to /dev/nvidia*, "
               f"or {_SIMULATE_HINT}")
    elif code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        msg = (f"NVML library and NVIDIA kernel driver versions differ ({what}): "
               f"reload the driver or reboot, or {_SIMULATE_HINT}")
    else:
        msg = f"NVML failed ({what}): check the NVIDIA driver with nvidia-smi, or {_SIMULATE_HINT}"
    return BackendUnavailable(msg)


class NvmlDevice:
    """One physical GPU behind an NVML handle; identity holds no handle, so GPUs match by UUID on restart."""

    def __init__(self, backend: NvmlBackend, generation: int, handle: Any, identity: GpuIdentity) -> None:
        self.identity = identity
        self._backend = backend
        self._generation = generation
        self._handle = handle
        self._clock = backend.clock
        self._monotonic = backend.monotonic
        self._label = f"GPU {identity.index} ({identity.uuid})"
        # Probed on first use, remembered until the next re-initialisation (a driver update may change them).
        self.energy_supported = True
        self.power_limit_supported = True
        self.utilization_supported = True
        self.memory_supported = True
        self.memory_v2 = getattr(pynvml, "nvmlMemory_v2", None) is not None
        self._processes_since_us = 0  # NVML process-utilization samples newer than this are unread

    @property
    def handle(self) -> Any:
        """The NVML handle, for other NVML readers of this GPU (workloads); stale after the next restart()."""
        return self._handle

    def _error(self, function: str, exc: BaseException) -> GpuReadError:
        code = _code(exc)
        kind, reinit = _KINDS.get(code, ("unknown", False)) if code is not None else ("unknown", False)
        return GpuReadError(kind, f"{self._label}: {function}: {_describe(exc)}", reinit=reinit)

    def _check_current(self) -> None:
        """Refuse to use a handle from before a re-initialisation (NVML may have freed it)."""
        backend = self._backend
        if not backend.initialized:
            raise GpuReadError("uninitialized", f"{self._label}: NVML is not initialised", reinit=True)
        if backend.generation != self._generation:
            if self.identity.uuid in backend.uuids:  # replaced by a new device object at re-initialisation
                raise GpuReadError("uninitialized", f"{self._label}: stale handle from before NVML "
                                   "re-initialisation; read the device restart() returned")
            raise GpuReadError("gpu_lost",
                               f"{self._label}: GPU was not found again at NVML re-initialisation")

    def _optional(self, function: str, call: Callable[[], Any]) -> tuple[Any, bool]:
        """Call an optional metric: (value, True); (None, False) when unsupported; (None, True) if transient.

        A serious error (GPU lost, driver gone) still fails the read; other errors cost this one value only.
        """
        try:
            return call(), True
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code in SERIOUS_ERRORS:
                raise self._error(function, exc) from None
            if code in _UNSUPPORTED:
                log.info("GPU metric not supported; not asking again",
                         extra=kv(gpu=self.identity.index, uuid=self.identity.uuid, function=function,
                                  err=_describe(exc)))
                return None, False
            log.debug("optional GPU metric failed",
                      extra=kv(gpu=self.identity.index, function=function, err=_describe(exc)))
            return None, True

    def read(self) -> GpuReading:
        self._check_current()
        handle = self._handle
        try:
            power_mw = pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError as exc:
            raise self._error("nvmlDeviceGetPowerUsage", exc) from None

        energy_mj: int | None = None
        if self.energy_supported:
            try:
                energy_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except pynvml.NVMLError as exc:
                if _code(exc) not in _UNSUPPORTED:
                    # The counter is the measurement: a failed read must not silently switch to integration.
                    raise self._error("nvmlDeviceGetTotalEnergyConsumption", exc) from None
                self.energy_supported = False
                log.info("GPU has no energy counter; power will be integrated",
                         extra=kv(gpu=self.identity.index, uuid=self.identity.uuid, err=_describe(exc)))
        timestamp = self._clock()
        mono = self._monotonic()

        limit_watts: float | None = None
        if self.power_limit_supported:
            limit_mw, self.power_limit_supported = self._optional(
                "nvmlDeviceGetEnforcedPowerLimit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            limit_watts = None if limit_mw is None else int(limit_mw) / 1000.0

        used_bytes, total_bytes = self._read_memory(handle)

        utilization: float | None = None
        if self.utilization_supported:
            rates, self.utilization_supported = self._optional(
                "nvmlDeviceGetUtilizationRates", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
            if rates is not None:
                utilization = min(1.0, max(0.0, int(rates.gpu) / 100.0))

        processes = None
        if self._backend.collect_processes:
            try:
                processes, self._processes_since_us = read_processes(pynvml, handle, self._processes_since_us)
            except pynvml.NVMLError as exc:
                raise self._error("nvmlDeviceGetComputeRunningProcesses", exc) from None

        return GpuReading(
            timestamp=timestamp,
            monotonic=mono,
            power_watts=int(power_mw) / 1000.0,
            energy_millijoules=energy_mj,
            power_limit_watts=limit_watts,
            memory_used_bytes=used_bytes,
            memory_total_bytes=total_bytes,
            utilization_ratio=utilization,
            processes=processes,
        )

    def _read_memory(self, handle: Any) -> tuple[int | None, int | None]:
        """Prefer the v2 struct, whose `used` excludes driver-reserved memory; fall back to v1 once."""
        if not self.memory_supported:
            return None, None
        if self.memory_v2:
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
                return int(mem.used), int(mem.total)
            except TypeError:  # a pynvml without the version argument
                self.memory_v2 = False
            except pynvml.NVMLError as exc:
                code = _code(exc)
                if code in SERIOUS_ERRORS:
                    raise self._error("nvmlDeviceGetMemoryInfo_v2", exc) from None
                if code not in _MEMORY_V2_FALLBACK:
                    return None, None  # transient: try v2 again next time
                self.memory_v2 = False
                log.info("memory info v2 not available; using v1 (counts reserved memory as used)",
                         extra=kv(gpu=self.identity.index, err=_describe(exc)))
        mem, self.memory_supported = self._optional(
            "nvmlDeviceGetMemoryInfo", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        if mem is None:
            return None, None
        return int(mem.used), int(mem.total)


BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def read_boot_id(path: str) -> str:
    """The kernel's id of this boot: NVML's energy counters count from driver load, so a reading from another
    boot cannot be compared with one from this boot. Unknown (unreadable) never matches anything."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read(64).strip() or f"unknown:{uuid.uuid4()}"
    except (OSError, ValueError) as exc:
        log.warning("cannot read the boot id; energy drawn while wattson was down will count as unmetered",
                    extra=kv(file=path, err=str(exc)))
        return f"unknown:{uuid.uuid4()}"


class NvmlBackend:
    """GPUs as NVML sees them. start() enumerates; restart() re-initialises after the driver went away."""

    name = "nvml"
    simulated = False

    def __init__(self, collect_processes: bool = False, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, boot_id_file: str = BOOT_ID_FILE) -> None:
        # Per-workload attribution (off by default) asks each read for the GPU's compute processes too;
        # off, NVML is never asked for them (they cost driver calls and may need more privileges).
        self.collect_processes = collect_processes
        self.clock = clock
        self.monotonic = monotonic
        self.initialized = False
        self.generation = 0
        self.driver_version = ""
        self.boot_id_file = boot_id_file
        self.counter_epoch = ""
        self.uuids: frozenset[str] = frozenset()  # GPUs of the current generation
        self._lock = threading.Lock()

    def start(self) -> list[GpuDevice]:
        with self._lock:
            return self._start()

    def restart(self) -> list[GpuDevice]:
        with self._lock:
            self._shutdown()
            return self._start()

    def close(self) -> None:
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        if not self.initialized:
            return
        self.initialized = False
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # the driver may already be gone; nothing left to release then
            log.debug("nvmlShutdown failed", extra=kv(err=_describe(exc)))

    def _start(self) -> list[GpuDevice]:
        if self.initialized:  # start() twice: keep NVML's init/shutdown reference count balanced
            self._shutdown()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise _unavailable("nvmlInit", exc) from None
        self.initialized = True
        self.generation += 1
        try:
            devices = self._enumerate()
        except BackendUnavailable:
            self._shutdown()
            raise
        self.counter_epoch = f"boot={read_boot_id(self.boot_id_file)} driver={self.driver_version}"
        log.info("NVML initialised",
                 extra=kv(driver_version=self.driver_version, gpus=len(devices)))
        return devices

    def _enumerate(self) -> list[GpuDevice]:
        try:
            self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion()) or "unknown"
        except pynvml.NVMLError as exc:
            if _code(exc) in SERIOUS_ERRORS:
                raise _unavailable("nvmlSystemGetDriverVersion", exc) from None
            self.driver_version = "unknown"
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise _unavailable("nvmlDeviceGetCount", exc) from None

        devices: list[GpuDevice] = []
        failures: list[str] = []
        for index in range(count):
            try:
                devices.append(self._open(index))
            except pynvml.NVMLError as exc:
                if _code(exc) in _DRIVER_GONE:
                    raise _unavailable(f"GPU {index}", exc) from None
                # One GPU off the bus or hidden from this container must not hide the others.
                failures.append(f"GPU {index}: {_describe(exc)}")
                log.warning("cannot open GPU; skipping it",
                            extra=kv(gpu=index, err=_describe(exc)))
        if count > 0 and not devices:
            raise BackendUnavailable(f"NVML found {count} GPU(s) but none could be opened "
                                     f"({'; '.join(failures)}): check the NVIDIA driver with nvidia-smi, "
                                     f"or {_SIMULATE_HINT}")
        self.uuids = frozenset(d.identity.uuid for d in devices)
        if count == 0:
            log.warning("NVML reports no GPUs on this host",
                        extra=kv(driver_version=self.driver_version))
        return devices

    def _open(self, index: int) -> NvmlDevice:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        name = _text(pynvml.nvmlDeviceGetName(handle))
        pci_bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
        identity = GpuIdentity(index=index, uuid=uuid, name=name, pci_bus_id=pci_bus_id,
                               driver_version=self.driver_version, mig_enabled=self._mig_enabled(handle))
        return NvmlDevice(self, self.generation, handle, identity)

    @staticmethod
    def _mig_enabled(handle: Any) -> bool:
        """MIG on: the physical GPU is still read as a whole (power and energy are per physical GPU)."""
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError as exc:
            if _code(exc) in SERIOUS_ERRORS:
                raise
            return False  # NotSupported: a GPU without MIG
        return int(current) == pynvml.NVML_DEVICE_MIG_ENABLE
