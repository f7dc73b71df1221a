"""The sampler: per-GPU faults, hung driver calls, re-initialisation, snapshots."""

from __future__ import annotations

import threading
import time

import pytest

from tests.fakes import Clock, ConstantGpu, ListBackend
from wattson.gpu.base import BackendUnavailable, GpuReadError
from wattson.sampler import Sampler


def make(gpus, timeout=0.2):
    backend = ListBackend(gpus)
    sampler = Sampler(backend, gpu_timeout_seconds=timeout, init_retry=(0.01, 0.05))
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
    sampler = Sampler(backend, gpu_timeout_seconds=0.5, init_retry=(0.01, 0.05))
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


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpu-reader-")]


def test_a_hang_mid_round_costs_that_gpu_only_and_a_fresh_reader_finishes_the_round():
    clock = Clock()
    gpus = [ConstantGpu(i, clock, 100 * (i + 1)) for i in range(4)]
    sampler, _ = make(gpus, timeout=0.2)
    clock.advance(1)
    sampler.sample_round()
    gpus[1].hang = threading.Event()
    clock.advance(1)
    started = time.monotonic()
    sampler.sample_round()
    took = time.monotonic() - started
    assert 0.2 <= took < 1.0  # one timeout, not one per GPU
    snap = by_index(sampler)
    assert snap[1].up is False and dict(snap[1].errors)["hung"] == 1
    # GPUs after the hung one were read in the same round, by the fresh reader
    assert [snap[i].energy_joules for i in (0, 2, 3)] == [100.0, 300.0, 400.0]
    assert all(snap[i].up for i in (0, 2, 3))
    gpus[1].hang.set()
    gpus[1].hang = None


def test_one_reader_thread_reads_every_gpu_and_a_stuck_one_leaves_once_its_call_returns():
    clock = Clock()
    gpus = [ConstantGpu(i, clock, 100) for i in range(16)]
    before = set(_reader_threads())
    sampler, _ = make(gpus, timeout=0.2)
    for _ in range(20):
        clock.advance(1)
        sampler.sample_round()
    mine = [t for t in _reader_threads() if t not in before]
    assert len(mine) == 1  # 16 GPUs, 20 rounds: one reader
    release = threading.Event()
    gpus[5].hang = release
    clock.advance(1)
    sampler.sample_round()
    stuck = [t for t in _reader_threads() if t not in before and t.is_alive()]
    assert len(stuck) == 2  # the abandoned one (inside the driver) and its successor
    release.set()
    gpus[5].hang = None
    deadline = time.monotonic() + 2
    while len([t for t in _reader_threads() if t not in before and t.is_alive()]) > 1:
        assert time.monotonic() < deadline, "the abandoned reader did not exit after its call returned"
        time.sleep(0.01)
    clock.advance(1)
    sampler.sample_round()
    assert by_index(sampler)[5].up is True
    assert by_index(sampler)[5].energy_joules == 21 * 100.0  # the counter covers the hang exactly
    sampler.stop()


def test_every_gpu_of_a_round_is_priced_from_the_grid_as_it_stood_when_the_round_began():
    from wattson.grid.signal import GridSignals, SignalChain
    from wattson.grid.static import StaticSource

    clock = Clock()
    price = SignalChain("price", "DE", 7200, [StaticSource("price", "DE", 0.30, "EUR")], clock=clock.time)
    price.poll_due()
    cheap = SignalChain("price", "DE", 7200, [StaticSource("price", "DE", 0.10, "EUR")], clock=clock.time)
    cheap.poll_due()

    class SwapsThePriceWhenRead(ConstantGpu):
        armed = False

        def read(self):
            if self.armed:
                price.state = cheap.state  # a fetch landing in the middle of a round
            return super().read()

    gpus = [ConstantGpu(0, clock, 1800), SwapsThePriceWhenRead(1, clock, 1800), ConstantGpu(2, clock, 1800)]
    sampler = Sampler(ListBackend(gpus), grid=GridSignals(price=price), clock=clock.time)
    sampler.start_backend()
    sampler.sample_round()
    gpus[1].armed = True
    clock.advance(20)  # 0.01 kWh per GPU
    sampler.sample_round()
    costs = [dict(g.account.cost)["EUR"] for g in sampler.snapshot.gpus]
    assert costs == [pytest.approx(0.003)] * 3  # GPU 2 read after the swap: still the round's price
    clock.advance(20)
    sampler.sample_round()
    costs = [dict(g.account.cost)["EUR"] for g in sampler.snapshot.gpus]
    assert costs == [pytest.approx(0.004)] * 3


def test_the_sampling_loop_marks_a_hung_gpu_within_the_timeout_and_keeps_its_pace_for_the_others():
    class WallClock:  # the loop runs on its own schedule, in real time
        def time(self) -> float:
            return time.time()

        def monotonic(self) -> float:
            return time.monotonic()

    gpus = [ConstantGpu(i, WallClock(), 100) for i in range(3)]
    backend = ListBackend(gpus)
    before = set(threading.enumerate())
    sampler = Sampler(backend, interval_seconds=0.05, gpu_timeout_seconds=0.2)
    sampler.start_backend()
    sampler.start()
    try:
        deadline = time.monotonic() + 2
        while sampler.snapshot.seq < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        release = threading.Event()
        gpus[1].hang = release
        hung_at = time.monotonic()
        while by_index(sampler)[1].up:
            assert time.monotonic() - hung_at < 0.2 + 0.05 + 0.2, "hang not detected within timeout + a watch"
            time.sleep(0.005)
        seq = sampler.snapshot.seq
        time.sleep(0.5)
        assert sampler.snapshot.seq - seq >= 5  # ~10 rounds at 20 Hz: the loop kept its pace
        assert by_index(sampler)[0].up and by_index(sampler)[2].up and not by_index(sampler)[1].up
        assert dict(by_index(sampler)[1].errors)["hung"] == 1
        release.set()
        gpus[1].hang = None
        deadline = time.monotonic() + 2
        while not by_index(sampler)[1].up:
            assert time.monotonic() < deadline, "GPU 1 did not come back after its call returned"
            time.sleep(0.01)
        deadline = time.monotonic() + 2
        while sorted(t.name for t in set(threading.enumerate()) - before) != ["sampler-2", "sampler-watchdog"]:
            assert time.monotonic() < deadline, "the abandoned loop thread did not exit after its call returned"
            time.sleep(0.01)
    finally:
        sampler.stop()
