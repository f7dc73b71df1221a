"""The compute processes of one GPU and their SM utilization, from NVML.

Called by the NVML backend's read() when workloads are enabled. Works with whichever variants the
installed pynvml and driver offer: nvmlDeviceGetComputeRunningProcesses (the current struct), then
the explicit _v3 and _v2 entry points. Per-process SM utilization comes from
nvmlDeviceGetProcessUtilization, which returns the samples taken since a timestamp; where it has no
samples (NotFound) or is not available (NotSupported, MIG, vGPU), sm_utilization is None and the
attribution falls back to memory used.

SERIOUS_ERRORS lives here, not in nvml.py, because nvml.py imports this module: both readers share it.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import pynvml

from ..logfmt import kv
from .base import GpuProcess

log = logging.getLogger("wattson.gpu.nvml")

# The GPU or the driver is gone or unusable: no answer from this GPU can be trusted, so every reader
# fails the whole read with it (the GPU is marked down, or NVML re-initialised) instead of treating it
# as one missing value or an empty process list.
SERIOUS_ERRORS = frozenset({
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
})

_RUNNING_PROCESS_FUNCTIONS = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
)
_NOT_AVAILABLE_UINT = 0xFFFFFFFF  # NVML_VALUE_NOT_AVAILABLE for unsigned ints: not a MIG instance
_NOT_AVAILABLE_ULONGLONG = 0xFFFFFFFFFFFFFFFF


def read_processes(nvml: ModuleType, handle: Any, last_seen_timestamp_us: int
                   ) -> tuple[tuple[GpuProcess, ...] | None, int]:
    """(processes, new timestamp) for one GPU; `nvml` is the pynvml module its functions are looked up in.

    processes is None when NVML cannot list processes on this GPU (not supported, no permission);
    the step is then reported as unattributed. Pass 0 as the first timestamp and the returned one
    afterwards, so each call sees the utilization samples of one sampling interval. Processes that
    ended during the interval but left utilization samples are included (without memory), so their
    last moments are charged to them. GPU-level failures (lost, driver gone) propagate as pynvml's
    NVMLError for the caller's normal error handling.
    """
    running = _running_processes(nvml, handle)
    if running is None:
        return None, last_seen_timestamp_us
    sm, new_timestamp = _sm_utilization(nvml, handle, last_seen_timestamp_us)
    processes: dict[int, GpuProcess] = {}
    for proc in running:
        pid = int(getattr(proc, "pid", 0) or 0)
        if pid <= 0:
            continue
        memory = getattr(proc, "usedGpuMemory", None)
        if memory is not None and (memory < 0 or memory >= _NOT_AVAILABLE_ULONGLONG):
            memory = None
        instance = getattr(proc, "gpuInstanceId", None)
        if instance is not None and instance >= _NOT_AVAILABLE_UINT:
            instance = None
        prev = processes.get(pid)
        if prev is not None:  # listed twice (e.g. once per MIG compute instance): add its memory up
            if memory is not None and prev.used_memory_bytes is not None:
                memory += prev.used_memory_bytes
            instance = prev.gpu_instance_id if prev.gpu_instance_id is not None else instance
        util = None
        if sm is not None and instance is None:  # MIG utilization is per instance, not comparable
            util = sm.get(pid, 0.0)
        processes[pid] = GpuProcess(pid, None if memory is None else int(memory), util,
                                    None if instance is None else int(instance))
    if sm is not None and not any(p.gpu_instance_id is not None for p in processes.values()):
        for pid, util in sm.items():
            if pid not in processes and util > 0:
                processes[pid] = GpuProcess(pid, None, util, None)
    return tuple(processes[pid] for pid in sorted(processes)), new_timestamp


def _running_processes(nvml: ModuleType, handle: Any) -> list[Any] | None:
    last_error: str | None = None
    for name in _RUNNING_PROCESS_FUNCTIONS:
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        try:
            return list(fn(handle))
        except pynvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in SERIOUS_ERRORS:
                raise
            last_error = f"{name}: {exc}"
            if code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                continue  # an older driver lacks this entry point: try the next variant
            break
        except (AttributeError, TypeError) as exc:  # pynvml/driver struct version mismatch
            last_error = f"{name}: {type(exc).__name__}: {exc}"
            continue
    log.debug("cannot list GPU processes; the step is unattributed", extra=kv(err=last_error))
    return None


def _sm_utilization(nvml: ModuleType, handle: Any, since_us: int) -> tuple[dict[int, float] | None, int]:
    """pid -> mean SM utilization (0..1) of the samples newer than since_us, and the newest sample
    time. None where NVML has no samples or no support."""
    fn = getattr(nvml, "nvmlDeviceGetProcessUtilization", None)
    if fn is None:
        return None, since_us
    try:
        samples = list(fn(handle, since_us))
    except pynvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if code in SERIOUS_ERRORS:
            raise
        if code != pynvml.NVML_SUCCESS:  # pynvml raises "success" when the first call finds no samples
            log.debug("no per-process utilization", extra=kv(err=str(exc)))
        return None, since_us
    sums: dict[int, tuple[float, int]] = {}
    newest = since_us
    for s in samples:
        ts = int(getattr(s, "timeStamp", 0) or 0)
        if ts <= since_us:
            continue  # the driver may repeat samples at the boundary
        newest = max(newest, ts)
        pid = int(getattr(s, "pid", 0) or 0)
        util = getattr(s, "smUtil", None)
        if pid <= 0 or util is None or not 0 <= util <= 100:
            continue
        total, count = sums.get(pid, (0.0, 0))
        sums[pid] = (total + util, count + 1)
    if not sums:
        return None, newest
    return {pid: total / count / 100.0 for pid, (total, count) in sums.items()}, newest
