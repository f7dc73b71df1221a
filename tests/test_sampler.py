"""The sampler: per-GPU faults, hung driver calls, re-initialisation, snapshots."""

from __future__ import annotations

import threading
import time

from tests.fakes import Clock, ConstantGpu, ListBackend
from wattson.config import SamplerConfig
from wattson.gpu.base import BackendUnavailable, GpuReadError
from wattson.sampler import Sampler


def make(gpus, timeout=0.2):
    backend = ListBackend(gpus)
    sampler = Sampler(backend, SamplerConfig(interval_seconds=1.0, gpu_timeout_seconds=timeout),
                      init_retry=(0.01, 0.05))
    sampler.start_backend()
    return sampler, backend


def by_index(sampler):
    return {g.identity.index: g for g in sampler.snapshot.gpus}


def test_one_failing_gpu_keeps_its_totals_and_others_keep_reporting():
    clock = Clock()
    a, b = ConstantGpu(0, clock, 100), ConstantGpu(1, clock, 200)
    sampler, _ = make([a, b])
    for _ in range(3):
        clock.advance(1)
        sampler.sample_round()
    assert by_index(sampler)[1].energy_joules == 400.0
    b.fail_with = GpuReadError("gpu_lost", "GPU 1: nvmlDeviceGetPowerUsage: GPU is lost")
    for _ in range(3):
        clock.advance(1)
        sampler.sample_round()
    snap = by_index(sampler)
    assert snap[1].up is False and snap[1].energy_joules == 400.0
    assert dict(snap[1].errors)["gpu_lost"] == 3
    assert snap[0].up is True and snap[0].energy_joules == 500.0


def test_a_hung_gpu_does_not_freeze_the_others():
    clock = Clock()
    a, b = ConstantGpu(0, clock, 100), ConstantGpu(1, clock, 200)
    sampler, _ = make([a, b], timeout=0.2)
    clock.advance(1)
    sampler.sample_round()
    b.hang = threading.Event()  # the next read of GPU 1 blocks
    started = time.monotonic()
    for _ in range(5):
        clock.advance(1)
        sampler.sample_round()
    # one round waits for the timeout; later rounds skip the still-busy GPU without waiting
    assert time.monotonic() - started < 1.5
    snap = by_index(sampler)
    assert snap[1].up is False and dict(snap[1].errors)["hung"] == 1  # counted once per hang
    assert snap[0].up is True and snap[0].energy_joules == 500.0  # 5 steps after the baseline
    b.hang.set()  # the driver call returns: the GPU comes back and its counter covers the gap exactly
    b.hang = None
    time.sleep(0.05)
    clock.advance(1)
    sampler.sample_round()
    clock.advance(1)
    sampler.sample_round()
    assert by_index(sampler)[1].up is True
    assert by_index(sampler)[1].energy_joules == 7 * 200.0


class FlakyBackend(ListBackend):
    """The driver goes away (reads ask for re-init) and comes back after `down` restart attempts."""

    def __init__(self, devices, down: int) -> None:
        super().__init__(devices)
        self.down = down
        self.restarts = 0

    def restart(self):
        self.restarts += 1
        if self.restarts <= self.down:
            raise BackendUnavailable("NVML: driver not loaded")
        for d in self.devices:
            d.fail_with = None
        return list(self.devices)


def test_driver_gone_is_retried_with_backoff_and_totals_survive():
    clock = Clock()
    gpu = ConstantGpu(0, clock, 100)
    backend = FlakyBackend([gpu], down=2)
    sampler = Sampler(backend, SamplerConfig(gpu_timeout_seconds=0.5), init_retry=(0.01, 0.05))
    sampler.start_backend()
    clock.advance(1)
    sampler.sample_round()
    clock.advance(1)
    sampler.sample_round()
    assert by_index(sampler)[0].energy_joules == 100.0
    gpu.fail_with = GpuReadError("driver_not_loaded", "driver not loaded", reinit=True)
    clock.advance(1)
    sampler.sample_round()
    assert by_index(sampler)[0].up is False
    deadline = time.monotonic() + 2
    while backend.restarts < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
        sampler.sample_round()
    assert backend.restarts == 3
    clock.advance(1)
    sampler.sample_round()
    g = by_index(sampler)[0]
    assert g.up is True
    # energy during the outage is covered by the counter difference, counted once
    assert g.energy_joules == 300.0


def test_snapshot_is_replaced_not_mutated():
    clock = Clock()
    sampler, _ = make([ConstantGpu(0, clock, 100)])
    clock.advance(1)
    first = sampler.sample_round()
    clock.advance(1)
    second = sampler.sample_round()
    assert first is not second and second.seq == first.seq + 1
    assert first.gpus[0].energy_joules == 0.0 and second.gpus[0].energy_joules == 100.0
