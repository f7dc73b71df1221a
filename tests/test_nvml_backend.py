"""NvmlBackend against a fake NVML driver that speaks pynvml's API and raises pynvml's error classes."""

from __future__ import annotations

import threading

import pynvml
import pytest

from tests.fake_nvml import Constant, FakeClock, FakeDriver, FakeGpu, GiB, MiB, constant, square_wave
from wattson.gpu.base import ERROR_KINDS, BackendUnavailable, GpuProcess, GpuReadError
from wattson.gpu.nvml import NvmlBackend
from wattson.gpu.nvml_processes import SERIOUS_ERRORS


def setup(monkeypatch, gpus, collect_processes=False, **driver_args):
    clock = FakeClock()
    driver = FakeDriver(clock, gpus, **driver_args).install(monkeypatch)
    backend = NvmlBackend(collect_processes=collect_processes, clock=clock.time, monotonic=clock.monotonic)
    return clock, driver, backend


def read_error(device) -> GpuReadError:
    with pytest.raises(GpuReadError) as info:
        device.read()
    return info.value


# --- identity and units ---------------------------------------------------------------------------

@pytest.mark.parametrize("bytes_strings", [False, True], ids=["str", "bytes"])
def test_start_enumerates_identity_fields_from_str_or_bytes(monkeypatch, bytes_strings):
    gpus = [FakeGpu(0), FakeGpu(1, "GPU-8d2f7c1e-33b1-4c55-9a0e-1f0a2b3c4d5e", "NVIDIA A100-SXM4-80GB",
                                pci_bus_id="00000000:CA:00.0")]
    _, _, backend = setup(monkeypatch, gpus, driver_version="550.54.15", bytes_strings=bytes_strings)
    assert (backend.name, backend.simulated) == ("nvml", False)
    devices = backend.start()
    assert [d.identity.index for d in devices] == [0, 1]
    ident = devices[1].identity
    assert ident.uuid == "GPU-8d2f7c1e-33b1-4c55-9a0e-1f0a2b3c4d5e"
    assert ident.name == "NVIDIA A100-SXM4-80GB"
    assert ident.pci_bus_id == "00000000:CA:00.0"
    assert ident.driver_version == "550.54.15"
    assert ident.mig_enabled is False
    assert devices[0].identity.uuid == gpus[0].uuid and isinstance(devices[0].identity.uuid, str)


def test_power_and_limit_are_converted_from_milliwatts_to_watts(monkeypatch):
    gpu = FakeGpu(0, power=constant(312.456), power_limit_watts=450.0)
    _, _, backend = setup(monkeypatch, [gpu])
    reading = backend.start()[0].read()
    assert reading.power_watts == pytest.approx(312.456)
    assert reading.power_limit_watts == 450.0


def test_energy_counter_is_reported_in_millijoules_and_tracks_the_power_profile(monkeypatch):
    gpu = FakeGpu(0, power=square_wave(600.0, 2.0, 100.0, 1.0))
    clock, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    first = device.read()
    assert first.energy_millijoules == gpu.energy_mj()
    clock.advance(4.5)
    second = device.read()
    # 4.5 s of a 600 W/2 s, 100 W/1 s wave starting at t=1000 s (phase 1 s into a period).
    expected_j = gpu.power.integral(clock.monotonic() - 4.5, clock.monotonic())
    assert second.energy_millijoules - first.energy_millijoules == round(expected_j * 1000)
    assert (second.timestamp, second.monotonic) == (clock.time(), clock.monotonic())
    assert second.power_watts == gpu.power(clock.monotonic())


def test_timestamps_are_taken_after_the_power_and_energy_reads(monkeypatch):
    class SlowPower(Constant):
        """A power read that takes 0.25 s, like a busy driver."""

        def __call__(self, t: float) -> float:
            clock.advance(0.25)
            return self.watts

    clock = FakeClock()
    gpu = FakeGpu(0, power=SlowPower(200.0))
    FakeDriver(clock, [gpu]).install(monkeypatch)
    device = NvmlBackend(clock=clock.time, monotonic=clock.monotonic).start()[0]
    before = clock.monotonic()
    reading = device.read()
    assert reading.monotonic == before + 0.25
    assert reading.energy_millijoules == gpu.energy_mj(before + 0.25)


# --- energy counter support -----------------------------------------------------------------------

@pytest.mark.parametrize("error", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND])
def test_unsupported_energy_counter_reads_none_and_is_not_asked_again(monkeypatch, error):
    gpu = FakeGpu(0)
    gpu.fail_next(error, function="nvmlDeviceGetTotalEnergyConsumption")
    clock, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    for _ in range(3):
        reading = device.read()
        assert reading.energy_millijoules is None and reading.power_watts == 300.0
        clock.advance(1)
    assert gpu.calls.count("nvmlDeviceGetTotalEnergyConsumption") == 1
    assert gpu.calls.count("nvmlDeviceGetPowerUsage") == 3


def test_pre_volta_gpu_without_counter_still_reads(monkeypatch):
    gpu = FakeGpu(0, "GPU-0b9e4c6a-1111-2222-3333-444455556666", "Tesla P100-PCIE-16GB",
                  energy_supported=False)
    _, _, backend = setup(monkeypatch, [gpu])
    assert backend.start()[0].read().energy_millijoules is None


def test_transient_energy_error_fails_the_read_instead_of_switching_to_integration(monkeypatch):
    gpu = FakeGpu(0)
    gpu.fail_next(pynvml.NVMLError_Timeout, function="nvmlDeviceGetTotalEnergyConsumption")
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    err = read_error(device)
    assert err.kind == "timeout" and "nvmlDeviceGetTotalEnergyConsumption" in str(err)
    assert device.read().energy_millijoules == gpu.energy_mj()


def test_counter_reset_is_reported_as_the_driver_reports_it(monkeypatch):
    gpu = FakeGpu(0, power=constant(250.0))
    clock, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    assert device.read().energy_millijoules > 1_000_000_000
    gpu.reset_counter()
    clock.advance(2.0)
    assert device.read().energy_millijoules == 500_000  # 250 W * 2 s since the reset, nothing before


# --- memory ---------------------------------------------------------------------------------------

def test_memory_v2_does_not_count_reserved_memory_as_used(monkeypatch):
    gpu = FakeGpu(0, memory_total=80 * GiB, memory_used=20 * GiB, memory_reserved=600 * MiB)
    _, _, backend = setup(monkeypatch, [gpu])
    reading = backend.start()[0].read()
    assert (reading.memory_used_bytes, reading.memory_total_bytes) == (20 * GiB, 80 * GiB)
    assert "nvmlDeviceGetMemoryInfo_v2" in gpu.calls and "nvmlDeviceGetMemoryInfo" not in gpu.calls


@pytest.mark.parametrize("error", [pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported,
                                   pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH])
def test_memory_falls_back_to_v1_once_when_v2_is_missing(monkeypatch, error):
    gpu = FakeGpu(0, memory_total=16 * GiB, memory_used=4 * GiB, memory_reserved=256 * MiB,
                  memory_v2_supported=False, memory_v2_error=error)
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    for _ in range(3):
        reading = device.read()
        assert (reading.memory_used_bytes, reading.memory_total_bytes) == (4 * GiB + 256 * MiB, 16 * GiB)
    assert gpu.calls.count("nvmlDeviceGetMemoryInfo_v2") == 1
    assert gpu.calls.count("nvmlDeviceGetMemoryInfo") == 3


# --- MIG ------------------------------------------------------------------------------------------

def test_mig_enabled_gpu_is_reported_and_read_as_the_physical_gpu(monkeypatch):
    # With MIG on, NVML answers utilization of the parent GPU with NotSupported; power and energy still work.
    gpu = FakeGpu(0, mig_mode=True, utilization=None, power=constant(410.0))
    _, _, backend = setup(monkeypatch, [gpu, FakeGpu(1, mig_mode=None)])
    devices = backend.start()
    assert devices[0].identity.mig_enabled is True
    assert devices[1].identity.mig_enabled is False  # MIG NotSupported = off
    reading = devices[0].read()
    assert reading.power_watts == 410.0 and reading.energy_millijoules == gpu.energy_mj()
    assert reading.utilization_ratio is None


# --- optional metrics -----------------------------------------------------------------------------

def test_optional_metrics_not_supported_do_not_fail_the_read_and_are_not_asked_again(monkeypatch):
    gpu = FakeGpu(0, power_limit_watts=None, utilization=None, memory_v2_supported=False,
                  memory_v2_error=pynvml.NVMLError_NotSupported)
    gpu.fail_next(pynvml.NVMLError_NotSupported, function="nvmlDeviceGetMemoryInfo")
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    for _ in range(2):
        reading = device.read()
        assert reading.power_watts == 300.0 and reading.energy_millijoules is not None
        assert reading.power_limit_watts is None and reading.utilization_ratio is None
        assert reading.memory_used_bytes is None and reading.memory_total_bytes is None
    for function in ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo_v2"):
        assert gpu.calls.count(function) == 1, function


def test_transient_optional_error_costs_that_value_once(monkeypatch):
    gpu = FakeGpu(0, utilization=0.73)
    gpu.fail_next(pynvml.NVMLError_Unknown, function="nvmlDeviceGetUtilizationRates")
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    assert device.read().utilization_ratio is None
    assert device.read().utilization_ratio == 0.73


def test_gpu_lost_during_an_optional_metric_fails_the_read(monkeypatch):
    gpu = FakeGpu(0)
    gpu.fail_next(pynvml.NVMLError_GpuIsLost, function="nvmlDeviceGetUtilizationRates")
    _, _, backend = setup(monkeypatch, [gpu])
    err = read_error(backend.start()[0])
    assert err.kind == "gpu_lost" and "nvmlDeviceGetUtilizationRates" in str(err)


@pytest.mark.parametrize("code", sorted(SERIOUS_ERRORS))
def test_every_serious_error_during_an_optional_metric_fails_the_read(monkeypatch, code):
    gpu = FakeGpu(0)
    gpu.fail_next(code, function="nvmlDeviceGetEnforcedPowerLimit")
    _, _, backend = setup(monkeypatch, [gpu])
    err = read_error(backend.start()[0])
    assert err.kind in ERROR_KINDS and "nvmlDeviceGetEnforcedPowerLimit" in str(err)


# --- compute processes (workloads) ----------------------------------------------------------------

def test_processes_are_listed_only_by_a_backend_built_to_collect_them(monkeypatch):
    gpu = FakeGpu(0, processes=[(4242, 2 * GiB), (4343, None)], process_sm={4242: 60})
    _, _, backend = setup(monkeypatch, [gpu])
    assert backend.collect_processes is False
    assert backend.start()[0].read().processes is None
    assert not [c for c in gpu.calls if "Process" in c]
    backend.close()

    _, _, backend = setup(monkeypatch, [gpu], collect_processes=True)
    reading = backend.start()[0].read()
    assert reading.processes == (GpuProcess(4242, 2 * GiB, 0.6, None), GpuProcess(4343, None, 0.0, None))


def test_a_gpu_that_cannot_list_processes_reads_with_processes_none(monkeypatch):
    gpu = FakeGpu(0, processes=None)
    _, _, backend = setup(monkeypatch, [gpu], collect_processes=True)
    reading = backend.start()[0].read()
    assert reading.processes is None and reading.power_watts == 300.0


@pytest.mark.parametrize("code", sorted(SERIOUS_ERRORS))
def test_every_serious_error_while_listing_processes_fails_the_read(monkeypatch, code):
    gpu = FakeGpu(0, processes=[(1, GiB)])
    _, _, backend = setup(monkeypatch, [gpu], collect_processes=True)
    device = backend.start()[0]
    gpu.fail_next(code, function="nvmlDeviceGetComputeRunningProcesses")
    err = read_error(device)
    assert err.kind in ERROR_KINDS and "nvmlDeviceGetComputeRunningProcesses" in str(err)
    if code == pynvml.NVML_ERROR_RESET_REQUIRED:
        assert err.kind == "gpu_lost"
    assert device.read().processes == (GpuProcess(1, GiB, None, None),)


# --- read errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "kind", "reinit", "text"), [
    (pynvml.NVMLError_GpuIsLost, "gpu_lost", False, "GPU is lost"),
    (pynvml.NVMLError_NotSupported, "not_supported", False, "Not Supported"),
    (pynvml.NVMLError_Timeout, "timeout", False, "Timeout"),
    (pynvml.NVMLError_DriverNotLoaded, "driver_not_loaded", True, "Driver Not Loaded"),
    (pynvml.NVMLError_Uninitialized, "uninitialized", True, "Uninitialized"),
    (pynvml.NVMLError_LibraryNotFound, "driver_not_loaded", True, "NVML Shared Library Not Found"),
    (pynvml.NVMLError_Unknown, "unknown", False, "Unknown Error"),
    (pynvml.NVMLError_InsufficientPower, "unknown", False, "Insufficient External Power"),
    (pynvml.NVML_ERROR_NO_DATA, "unknown", False, "No data"),
])
def test_power_read_errors_map_to_bounded_kinds_and_reinit_flags(monkeypatch, error, kind, reinit, text):
    gpu = FakeGpu(1, "GPU-5b1c0e2a-7d3f-4e9a-8b6c-0a1b2c3d4e5f")
    _, _, backend = setup(monkeypatch, [FakeGpu(0), gpu])
    device = backend.start()[1]
    gpu.fail_next(error, function="nvmlDeviceGetPowerUsage")
    err = read_error(device)
    assert err.kind == kind and err.kind in ERROR_KINDS
    assert err.reinit is reinit
    assert str(err) == f"GPU 1 (GPU-5b1c0e2a-7d3f-4e9a-8b6c-0a1b2c3d4e5f): nvmlDeviceGetPowerUsage: {text}"
    assert "\n" not in str(err)
    assert device.read().power_watts == 300.0  # the fault was one call only


def test_lost_gpu_fails_every_read_until_it_is_back(monkeypatch):
    gpu = FakeGpu(0)
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    gpu.lost = True
    assert [read_error(device).kind for _ in range(2)] == ["gpu_lost", "gpu_lost"]
    gpu.lost = False
    assert device.read().power_watts == 300.0


def test_hung_driver_call_blocks_the_read_until_released(monkeypatch):
    gpu = FakeGpu(0)
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    release = gpu.hang()
    results: list = []
    reader = threading.Thread(target=lambda: results.append(device.read()), daemon=True)
    reader.start()
    reader.join(0.1)
    assert reader.is_alive() and results == []
    release.set()
    reader.join(2.0)
    assert not reader.is_alive() and results[0].power_watts == 300.0


def test_hang_is_bounded_and_surfaces_as_a_timeout(monkeypatch):
    gpu = FakeGpu(0, hang_timeout_s=0.05)
    _, _, backend = setup(monkeypatch, [gpu])
    device = backend.start()[0]
    gpu.hang()
    assert read_error(device).kind == "timeout"


# --- start, restart, close ------------------------------------------------------------------------

@pytest.mark.parametrize(("driver_args", "expected"), [
    ({"library_missing": True}, "NVML library libnvidia-ml.so.1 not found: no NVIDIA driver on this host; "
                                "run with --simulate to use simulated GPUs"),
    ({"init_failures": 1}, "NVIDIA kernel driver is not loaded (nvmlInit: Driver Not Loaded): "
                           "load the nvidia module, or run with --simulate to use simulated GPUs"),
    ({"init_failures": 1, "init_error": pynvml.NVMLError_NoPermission},
     "no permission to use the NVIDIA driver (nvmlInit: Insufficient Permissions): "
     "give wattson access to /dev/nvidia*, or run with --simulate to use simulated GPUs"),
    ({"init_failures": 1, "init_error": pynvml.NVMLError_LibRmVersionMismatch},
     "NVML library and NVIDIA kernel driver versions differ (nvmlInit: RM has detected an NVML/RM version "
     "mismatch.): reload the driver or reboot, or run with --simulate to use simulated GPUs"),
    ({"init_failures": 1, "init_error": pynvml.NVMLError_Unknown},
     "NVML failed (nvmlInit: Unknown Error): check the NVIDIA driver with nvidia-smi, "
     "or run with --simulate to use simulated GPUs"),
])
def test_start_failures_are_one_line_and_suggest_simulate(monkeypatch, driver_args, expected):
    _, driver, backend = setup(monkeypatch, [FakeGpu(0)], **driver_args)
    with pytest.raises(BackendUnavailable) as info:
        backend.start()
    assert str(info.value) == expected
    assert driver.refcount == 0 and backend.initialized is False


def test_start_succeeds_once_the_driver_loads(monkeypatch):
    _, driver, backend = setup(monkeypatch, [FakeGpu(0)], init_failures=2)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            backend.restart()
    assert [d.identity.index for d in backend.restart()] == [0]
    assert driver.init_calls == 3 and driver.refcount == 1


def test_restart_after_the_driver_went_away_finds_the_same_gpus(monkeypatch):
    gpus = [FakeGpu(0, power=constant(100.0)), FakeGpu(1, power=constant(200.0))]
    clock, driver, backend = setup(monkeypatch, gpus)
    old = backend.start()
    driver.gone = True
    err = read_error(old[0])
    assert (err.kind, err.reinit) == ("driver_not_loaded", True)
    with pytest.raises(BackendUnavailable, match="nvmlInit: Driver Not Loaded.*--simulate"):
        backend.restart()  # nvmlShutdown failing on the way is ignored
    assert backend.initialized is False
    driver.gone = False
    new = backend.restart()
    assert [d.identity for d in new] == [d.identity for d in old]  # matched by UUID, handle-free
    clock.advance(1)
    assert [d.read().power_watts for d in new] == [100.0, 200.0]
    assert driver.refcount == 1
    # The old device objects hold handles from before: they refuse to use them.
    stale = read_error(old[1])
    assert stale.kind == "uninitialized" and "stale handle" in str(stale)


def test_gpu_missing_after_restart_reads_as_lost_and_the_rest_continue(monkeypatch):
    first, second = FakeGpu(0), FakeGpu(1)
    _, driver, backend = setup(monkeypatch, [first, second])
    old = backend.start()
    driver.gpus.remove(first)
    new = backend.restart()
    assert [d.identity.uuid for d in new] == [second.uuid]
    assert new[0].identity.index == 0  # NVML renumbers; the sampler matches by UUID
    assert read_error(old[0]).kind == "gpu_lost"


def test_reads_while_nvml_is_down_ask_for_reinit(monkeypatch):
    _, driver, backend = setup(monkeypatch, [FakeGpu(0)])
    device = backend.start()[0]
    driver.gone = True
    with pytest.raises(BackendUnavailable):
        backend.restart()
    err = read_error(device)
    assert (err.kind, err.reinit) == ("uninitialized", True)


def test_a_gpu_that_cannot_be_opened_is_skipped(monkeypatch):
    gpus = [FakeGpu(0), FakeGpu(1), FakeGpu(2)]
    gpus[1].lost = True
    _, _, backend = setup(monkeypatch, gpus)
    assert [d.identity.index for d in backend.start()] == [0, 2]


def test_no_gpu_can_be_opened_is_unavailable(monkeypatch):
    gpus = [FakeGpu(0), FakeGpu(1)]
    for gpu in gpus:
        gpu.lost = True
    _, driver, backend = setup(monkeypatch, gpus)
    with pytest.raises(BackendUnavailable) as info:
        backend.start()
    assert str(info.value).startswith(
        "NVML found 2 GPU(s) but none could be opened (GPU 0: GPU is lost; GPU 1: GPU is lost):")
    assert "--simulate" in str(info.value) and driver.refcount == 0


def test_host_without_gpus_starts_with_none(monkeypatch):
    _, _, backend = setup(monkeypatch, [])
    assert backend.start() == []


def test_close_shuts_nvml_down_once(monkeypatch):
    _, driver, backend = setup(monkeypatch, [FakeGpu(0)])
    backend.start()
    backend.close()
    backend.close()
    assert driver.refcount == 0 and driver.shutdown_calls == 1


def test_fake_driver_refuses_unfaked_pynvml_functions(monkeypatch):
    """Guard for the fake itself: nothing may reach a real libnvidia-ml during unit tests."""
    setup(monkeypatch, [FakeGpu(0)])
    with pytest.raises(AssertionError, match="nvmlDeviceGetTemperature is not faked"):
        pynvml.nvmlDeviceGetTemperature(None, 0)
