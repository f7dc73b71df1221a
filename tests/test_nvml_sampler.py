"""The sampler over the real NVML backend, driven through pynvml's API and error classes by a fake driver
whose power profiles have known integrals."""

from __future__ import annotations

import time

import pynvml
import pytest

from tests.fake_nvml import FakeClock, FakeDriver, FakeGpu, constant, square_wave
from wattson.gpu.base import BackendUnavailable
from wattson.gpu.nvml import NvmlBackend
from wattson.sampler import Sampler

WAVE = (620.0, 2.0, 180.0, 0.5)  # 2 s at 620 W, 0.5 s at 180 W


def setup(monkeypatch, gpus, timeout=0.3, **driver_kw):
    clock = FakeClock()
    driver = FakeDriver(clock, gpus, **driver_kw).install(monkeypatch)
    backend = NvmlBackend(clock=clock.time, monotonic=clock.monotonic)
    sampler = Sampler(backend, interval_seconds=0.1, gpu_timeout_seconds=timeout, clock=clock.time,
                      init_retry=(0.01, 0.02))
    sampler.start_backend()
    return clock, driver, sampler


def run(sampler, clock, seconds, step=0.1):
    for _ in range(round(seconds / step)):
        clock.advance(step)
        sampler.sample_round()


def gpu(sampler, index):
    return next(g for g in sampler.snapshot.gpus if g.identity.index == index)


def test_counter_path_equals_the_integral(monkeypatch):
    wave = square_wave(*WAVE)
    clock, _driver, sampler = setup(monkeypatch, [FakeGpu(0, power=wave), FakeGpu(1, power=constant(300))])
    sampler.sample_round()
    t0 = clock.monotonic()
    run(sampler, clock, 30)
    g0 = gpu(sampler, 0)
    assert g0.energy_method == "counter"
    # the counter is in whole mJ; differences telescope, so the total is exact to 1 mJ
    assert g0.energy_joules == pytest.approx(wave.integral(t0, clock.monotonic()), abs=0.002)
    assert gpu(sampler, 1).energy_joules == pytest.approx(300 * 30, abs=0.002)


def test_integrated_path_within_one_percent_at_10_hz(monkeypatch):
    wave = square_wave(*WAVE)
    clock, _driver, sampler = setup(monkeypatch, [FakeGpu(0, power=wave, energy_supported=False)])
    clock.advance(0.05)  # samples not aligned with the wave's edges
    sampler.sample_round()
    t0 = clock.monotonic()
    run(sampler, clock, 60)
    g0 = gpu(sampler, 0)
    assert g0.energy_method == "integrated"
    truth = wave.integral(t0, clock.monotonic())
    assert abs(g0.energy_joules - truth) / truth < 0.01


def test_counter_reset_counts_nothing_for_that_step(monkeypatch):
    fake = FakeGpu(0, power=constant(400))
    clock, _driver, sampler = setup(monkeypatch, [fake])
    sampler.sample_round()
    run(sampler, clock, 5, step=1.0)
    assert gpu(sampler, 0).energy_joules == pytest.approx(2000, abs=0.002)
    clock.advance(1.0)
    fake.reset_counter()  # driver reload: counter back to 0
    sampler.sample_round()
    g = gpu(sampler, 0)
    assert g.energy_joules == pytest.approx(2000, abs=0.002)  # the reset step is not counted
    assert dict(g.errors)["counter_reset"] == 1
    run(sampler, clock, 3, step=1.0)
    assert gpu(sampler, 0).energy_joules == pytest.approx(3200, abs=0.002)


def test_gpu_lost_mid_run_keeps_its_totals_and_the_other_gpu_reports(monkeypatch):
    a, b = FakeGpu(0, power=constant(100)), FakeGpu(1, power=constant(200))
    clock, _driver, sampler = setup(monkeypatch, [a, b])
    sampler.sample_round()
    run(sampler, clock, 2, step=1.0)
    b.lost = True
    run(sampler, clock, 3, step=1.0)
    g1 = gpu(sampler, 1)
    assert g1.up is False and g1.energy_joules == pytest.approx(400, abs=0.002)
    assert dict(g1.errors)["gpu_lost"] == 3
    g0 = gpu(sampler, 0)
    assert g0.up is True and g0.energy_joules == pytest.approx(500, abs=0.002)
    b.lost = False  # back on the bus: the counter difference covers the outage, counted once
    run(sampler, clock, 1, step=1.0)
    assert gpu(sampler, 1).up is True
    assert gpu(sampler, 1).energy_joules == pytest.approx(1200, abs=0.002)


def test_driver_gone_then_back_reinitialises_with_backoff(monkeypatch):
    fake = FakeGpu(0, power=constant(250))
    clock, driver, sampler = setup(monkeypatch, [fake])
    sampler.sample_round()
    run(sampler, clock, 2, step=1.0)
    driver.gone = True
    clock.advance(1.0)
    sampler.sample_round()
    assert gpu(sampler, 0).up is False
    inits = driver.init_calls
    for _ in range(3):  # re-initialisation keeps failing while the driver is away
        time.sleep(0.03)
        clock.advance(1.0)
        sampler.sample_round()
    assert driver.init_calls > inits
    assert gpu(sampler, 0).up is False and gpu(sampler, 0).energy_joules == pytest.approx(500, abs=0.002)
    driver.gone = False
    deadline = time.monotonic() + 2
    while not gpu(sampler, 0).up and time.monotonic() < deadline:
        time.sleep(0.03)
        clock.advance(1.0)
        sampler.sample_round()
    g = gpu(sampler, 0)
    assert g.up is True
    # the fake's counter kept running through the outage (no reload): all of it is counted, once
    assert g.energy_joules == pytest.approx(250 * (clock.monotonic() - 1000.0), abs=0.002)


def test_init_failing_at_start_is_backend_unavailable(monkeypatch):
    clock = FakeClock()
    FakeDriver(clock, [FakeGpu(0)], init_failures=1).install(monkeypatch)
    sampler = Sampler(NvmlBackend(clock=clock.time, monotonic=clock.monotonic))
    with pytest.raises(BackendUnavailable, match="--simulate"):
        sampler.start_backend()


def test_one_gpu_hanging_does_not_stop_the_others(monkeypatch):
    a, b = FakeGpu(0, power=constant(100)), FakeGpu(1, power=constant(200), hang_timeout_s=3.0)
    clock, _driver, sampler = setup(monkeypatch, [a, b], timeout=0.2)
    sampler.sample_round()
    release = b.hang()
    started = time.monotonic()
    run(sampler, clock, 5, step=1.0)
    assert time.monotonic() - started < 1.5  # only the first round waited for the timeout
    assert gpu(sampler, 1).up is False and dict(gpu(sampler, 1).errors)["hung"] == 1
    assert gpu(sampler, 0).energy_joules == pytest.approx(500, abs=0.002)
    release.set()
    b.release()
    deadline = time.monotonic() + 2
    while not gpu(sampler, 1).up and time.monotonic() < deadline:
        time.sleep(0.02)
        clock.advance(1.0)
        sampler.sample_round()
    assert gpu(sampler, 1).up is True


def test_errors_are_pynvmls_own_classes(monkeypatch):
    """Guard: the fake raises the same classes a real driver does through pynvml."""
    fake = FakeGpu(0)
    clock, _driver, sampler = setup(monkeypatch, [fake])
    fake.fail_next(pynvml.NVMLError_Unknown, function="nvmlDeviceGetPowerUsage")
    clock.advance(1)
    sampler.sample_round()
    assert dict(gpu(sampler, 0).errors) == {"unknown": 1}


def test_processes_are_read_only_when_workloads_ask(monkeypatch):
    from types import SimpleNamespace

    fake = FakeGpu(0, power=constant(300))
    clock, _driver, sampler = setup(monkeypatch, [fake])
    procs = [SimpleNamespace(pid=4242, usedGpuMemory=2 * 1024**3, gpuInstanceId=0xFFFFFFFF,
                             computeInstanceId=0xFFFFFFFF)]
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: procs, raising=False)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetProcessUtilization",
                        lambda h, ts: (_ for _ in ()).throw(pynvml.NVMLError_NotFound()), raising=False)
    reading = sampler.gpus[0].device.read()
    assert reading.processes is None  # workloads off: NVML is not asked
    sampler.backend.collect_processes = True
    reading = sampler.gpus[0].device.read()
    assert [p.pid for p in reading.processes] == [4242]
    assert reading.processes[0].used_memory_bytes == 2 * 1024**3
    fake.lost = True
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses",
                        lambda h: (_ for _ in ()).throw(pynvml.NVMLError_GpuIsLost()), raising=False)
    fake.lost = False  # only the process call fails: the read fails as gpu_lost, like any serious error
    clock.advance(1)
    sampler.sample_round()
    assert dict(gpu(sampler, 0).errors).get("gpu_lost") == 1
