"""read_processes against pynvml with its functions monkeypatched (raising pynvml's own errors)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from wattson.gpu.base import GpuProcess
from wattson.gpu.nvml_processes import SERIOUS_ERRORS, read_processes

GiB = 1024**3
HANDLE = object()
NOT_MIG = 0xFFFFFFFF


def proc(pid, memory=GiB, gi=NOT_MIG, ci=NOT_MIG):
    """What nvmlStructToFriendlyObject makes of a c_nvmlProcessInfo_v3_t (memory None = not available)."""
    return SimpleNamespace(pid=pid, usedGpuMemory=memory, gpuInstanceId=gi, computeInstanceId=ci)


def sample(pid, ts, sm):
    return pynvml.c_nvmlProcessUtilizationSample_t(pid, ts, sm, 10, 0, 0)


def raiser(code):
    def fn(*args):
        raise pynvml.NVMLError(code)
    return fn


@pytest.fixture
def nvml(monkeypatch):
    """pynvml with the process functions replaced; tests set `calls` to see which ran."""
    calls: list[str] = []

    def install(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)
        monkeypatch.setattr(pynvml, name, wrapped)

    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v3",
                 "nvmlDeviceGetComputeRunningProcesses_v2"):
        install(name, raiser(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND))
    install("nvmlDeviceGetProcessUtilization", raiser(pynvml.NVML_ERROR_NOT_FOUND))
    return SimpleNamespace(install=install, calls=calls)


def test_processes_with_sm_utilization_averaged_over_the_interval(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(200, 30 * GiB), proc(100, 10 * GiB)])
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [
        sample(100, 1_000_100, 80), sample(100, 1_000_600, 40), sample(200, 1_000_500, 20),
        sample(200, 1_000_000, 99),  # not newer than the last seen timestamp: already counted
    ])
    processes, ts = read_processes(pynvml, HANDLE, 1_000_000)
    assert processes == (GpuProcess(100, 10 * GiB, 0.6, None), GpuProcess(200, 30 * GiB, 0.2, None))
    assert ts == 1_000_600


def test_a_process_without_samples_has_zero_sm_and_an_ended_one_is_kept(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(100), proc(200)])
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [
        sample(100, 10, 50), sample(300, 11, 30), sample(400, 12, 0)])
    processes, ts = read_processes(pynvml, HANDLE, 0)
    assert processes == (GpuProcess(100, GiB, 0.5, None), GpuProcess(200, GiB, 0.0, None),
                         GpuProcess(300, None, 0.3, None))  # 300 ended during the interval; 400 did nothing
    assert ts == 12


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_NOT_SUPPORTED,
                                  pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_SUCCESS])
def test_no_utilization_samples_leave_sm_unknown(nvml, code):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(100, None)])
    nvml.install("nvmlDeviceGetProcessUtilization", raiser(code))
    processes, ts = read_processes(pynvml, HANDLE, 777)
    assert processes == (GpuProcess(100, None, None, None),)
    assert ts == 777


def test_an_empty_sample_list_leaves_sm_unknown(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(100)])
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [])
    assert read_processes(pynvml, HANDLE, 5) == ((GpuProcess(100, GiB, None, None),), 5)


def test_no_processes_is_an_empty_tuple_not_none(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [])
    assert read_processes(pynvml, HANDLE, 0) == ((), 0)


def test_falls_back_to_v3_then_v2_when_the_driver_lacks_an_entry_point(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses_v2", lambda h: [proc(42)])
    processes, _ = read_processes(pynvml, HANDLE, 0)
    assert [p.pid for p in processes] == [42]
    assert nvml.calls[:3] == ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v3",
                              "nvmlDeviceGetComputeRunningProcesses_v2"]


def test_a_struct_version_mismatch_tries_the_next_variant(nvml):
    def mismatch(h):
        raise TypeError("struct size mismatch")
    nvml.install("nvmlDeviceGetComputeRunningProcesses", mismatch)
    nvml.install("nvmlDeviceGetComputeRunningProcesses_v3", lambda h: [proc(7)])
    assert [p.pid for p in read_processes(pynvml, HANDLE, 0)[0]] == [7]


def test_a_pynvml_without_the_newer_names_uses_what_it_has(nvml, monkeypatch):
    monkeypatch.delattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v3")
    monkeypatch.delattr(pynvml, "nvmlDeviceGetComputeRunningProcesses")
    nvml.install("nvmlDeviceGetComputeRunningProcesses_v2", lambda h: [proc(9)])
    assert [p.pid for p in read_processes(pynvml, HANDLE, 0)[0]] == [9]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION,
                                  pynvml.NVML_ERROR_UNKNOWN])
def test_process_list_not_available_is_none(nvml, code):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", raiser(code))
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [sample(1, 5, 50)])
    assert read_processes(pynvml, HANDLE, 3) == (None, 3)
    assert "nvmlDeviceGetComputeRunningProcesses_v3" not in nvml.calls  # a real answer, not a missing symbol


def test_all_variants_missing_is_none(nvml):
    assert read_processes(pynvml, HANDLE, 0) == (None, 0)


@pytest.mark.parametrize("code, cls", [(pynvml.NVML_ERROR_GPU_IS_LOST, "NVMLError_GpuIsLost"),
                                       (pynvml.NVML_ERROR_UNINITIALIZED, "NVMLError_Uninitialized"),
                                       (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded")])
def test_gpu_level_failures_propagate_for_the_backend_to_handle(nvml, code, cls):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", raiser(code))
    with pytest.raises(getattr(pynvml, cls)):
        read_processes(pynvml, HANDLE, 0)
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(1)])
    nvml.install("nvmlDeviceGetProcessUtilization", raiser(code))
    with pytest.raises(getattr(pynvml, cls)):
        read_processes(pynvml, HANDLE, 0)


@pytest.mark.parametrize("code", sorted(SERIOUS_ERRORS))
def test_every_serious_error_propagates_from_both_calls(nvml, code):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", raiser(code))
    with pytest.raises(pynvml.NVMLError) as info:
        read_processes(pynvml, HANDLE, 0)
    assert info.value.value == code
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(1)])
    nvml.install("nvmlDeviceGetProcessUtilization", raiser(code))
    with pytest.raises(pynvml.NVMLError) as info:
        read_processes(pynvml, HANDLE, 0)
    assert info.value.value == code


def test_serious_errors_include_reset_required_and_a_missing_library():
    assert {pynvml.NVML_ERROR_RESET_REQUIRED, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
            pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
            pynvml.NVML_ERROR_UNINITIALIZED} <= SERIOUS_ERRORS


def test_mig_processes_carry_their_gpu_instance_and_no_sm(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [
        proc(100, 5 * GiB, gi=1, ci=0), proc(200, 10 * GiB, gi=2, ci=0), proc(200, 2 * GiB, gi=2, ci=1)])
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [sample(100, 10, 90), sample(300, 10, 50)])
    processes, _ = read_processes(pynvml, HANDLE, 0)
    assert processes == (GpuProcess(100, 5 * GiB, None, 1), GpuProcess(200, 12 * GiB, None, 2))


def test_bogus_entries_are_skipped(nvml):
    nvml.install("nvmlDeviceGetComputeRunningProcesses", lambda h: [
        proc(0), SimpleNamespace(pid=55, usedGpuMemory=0xFFFFFFFFFFFFFFFF), SimpleNamespace(pid=56)])
    nvml.install("nvmlDeviceGetProcessUtilization", lambda h, ts: [sample(55, 10, 250)])
    processes, ts = read_processes(pynvml, HANDLE, 0)
    # pid 0 dropped; a raw not-available memory value is None; an impossible 250% sample is ignored
    # (so there is no usable sample at all and SM stays unknown); a v1 struct has no instance field
    assert processes == (GpuProcess(55, None, None, None), GpuProcess(56, None, None, None))
    assert ts == 10
