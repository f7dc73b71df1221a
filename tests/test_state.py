"""Durable state: the state file's round trip, every way it can be unusable, and totals that continue
across a restart (the gap accounted from the energy counter, or counted as unmetered time)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tests.fakes import Clock, ConstantGpu, ListBackend
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import StaticSource
from wattson.sampler import Sampler
from wattson.state import FILE_NAME, VERSION, PeriodicSaver, StateStore, parse_state


def priced_grid(clock: Clock) -> GridSignals:
    price = SignalChain("price", "DE", 7 * 86400, [StaticSource("price", "DE", 0.30, "EUR")], clock=clock.time)
    carbon = SignalChain("carbon", "DE", 7 * 86400, [StaticSource("carbon", "DE", 400.0, None)], clock=clock.time)
    price.poll_due()
    carbon.poll_due()
    return GridSignals(pue=1.0, carbon=carbon, price=price)


class Host:
    """One host's GPU (its counter keeps running whether wattson runs or not) and its wattson runs."""

    def __init__(self, tmp_path: Path, watts: float = 500.0) -> None:
        self.clock = Clock()
        self.gpu = ConstantGpu(0, self.clock, watts)
        self.backend = ListBackend([self.gpu])
        self.storage = tmp_path / "state"

    def run(self, seconds: int) -> Sampler:
        """Start wattson, restoring what a previous run saved, and sample once a second for `seconds`."""
        sampler = Sampler(self.backend, grid=priced_grid(self.clock), clock=self.clock.time)
        sampler.start_backend()
        store = StateStore(str(self.storage), clock=self.clock.time)
        saved = store.load({self.gpu.identity.uuid})
        if saved is not None:
            sampler.restore(saved)
        for _ in range(seconds):
            sampler.sample_round()
            self.clock.advance(1)
        sampler.sample_round()
        self.store = store
        return sampler

    def save(self, sampler: Sampler) -> None:
        doc = sampler.state_document()
        assert doc is not None and self.store.save(doc)


def totals(sampler: Sampler) -> tuple[float, float, float, float]:
    g = sampler.snapshot.gpus[0]
    return g.energy_joules, dict(g.account.cost).get("EUR", 0.0), g.account.co2e_grams, g.unmetered_seconds


def test_totals_continue_and_the_downtime_is_counted_from_the_energy_counter(tmp_path):
    host = Host(tmp_path)
    first = host.run(10)
    host.save(first)
    assert totals(first)[0] == 10 * 500.0
    host.clock.advance(20)  # wattson is down for 20 s; the GPU's counter keeps counting
    second = host.run(10)
    energy, cost, grams, unmetered = totals(second)
    # 10 s + the 20 s between the last saved reading and the first new one + 10 s, at 500 W
    assert energy == 40 * 500.0
    assert cost == pytest.approx(energy / 3.6e6 * 0.30, rel=1e-12)
    assert grams == pytest.approx(energy / 3.6e6 * 400.0, rel=1e-12)
    assert unmetered == 0.0


def test_after_a_reboot_the_downtime_is_unmetered_never_guessed(tmp_path):
    host = Host(tmp_path)
    first = host.run(10)
    host.save(first)
    host.clock.advance(20)
    host.backend.counter_epoch = "after-reboot"  # type: ignore[misc]
    second = host.run(10)
    energy, _cost, _grams, unmetered = totals(second)
    assert energy == 20 * 500.0  # the two runs' own steps only
    assert unmetered == 20.0


def test_an_implausible_counter_difference_is_unmetered(tmp_path):
    host = Host(tmp_path)
    first = host.run(5)
    host.save(first)
    host.clock.advance(20)
    host.gpu.watts = 2000.0  # far over the 700 W enforced limit for the whole gap: not a counter of this boot
    second = host.run(1)
    assert totals(second)[0] == 5 * 500.0 + 2000.0  # the new run's one step, nothing for the gap
    assert totals(second)[3] == 20.0


def test_state_round_trip_keeps_every_total(tmp_path):
    host = Host(tmp_path)
    sampler = host.run(3)
    host.save(sampler)
    saved = parse_state((host.storage / FILE_NAME).read_text())
    g = saved.gpus[host.gpu.identity.uuid]
    snap = sampler.snapshot.gpus[0]
    assert g.energy_joules == snap.energy_joules and g.cost == dict(snap.account.cost)
    assert g.co2e_grams == snap.account.co2e_grams and g.method == "counter"
    assert g.counter_millijoules == snap.reading.energy_millijoules and g.counter_epoch == "fake-boot"


@pytest.mark.parametrize("content, reason", [
    (b'{"format": "wattson-state", "version": 1, "gpus": {', "corrupt"),  # truncated
    (b"\xff\xfe not text", "corrupt"),
    (b"[]", "corrupt"),
    (json.dumps({"format": "wattson-state", "version": VERSION + 1, "written_at": 1, "gpus": {}}).encode(),
     "version"),
    (json.dumps({"format": "wattson-state", "version": VERSION, "written_at": 1,
                 "gpus": {"GPU-other": {"energy_joules": 5.0}}}).encode(), "foreign"),
    (json.dumps({"format": "wattson-state", "version": VERSION, "written_at": 1,
                 "gpus": {"GPU-00000000-0000-0000-0000-000000000000": {"energy_joules": -5.0}}}).encode(),
     "corrupt"),
    (json.dumps({"format": "wattson-state", "version": VERSION, "written_at": 1,
                 "gpus": {"GPU-00000000-0000-0000-0000-000000000000": {"energy_joules": "NaN"}}}).encode(),
     "corrupt"),
])
def test_an_unusable_state_file_is_set_aside_counted_and_wattson_starts_from_zero(tmp_path, caplog, content,
                                                                                  reason):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / FILE_NAME).write_bytes(content)
    host = Host(tmp_path)
    with caplog.at_level(logging.WARNING):
        sampler = host.run(2)
    assert totals(sampler)[0] == 2 * 500.0  # a fresh start: no double count, no crash
    assert [m for m in caplog.messages if "state file not used" in m]
    assert not (tmp_path / "state" / FILE_NAME).exists()
    aside = list((tmp_path / "state").glob(f"{FILE_NAME}.{reason}-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept for a person to look at
    assert ("load", reason, 1) in host.store.status().errors


def test_an_unreadable_state_file_is_counted_and_skipped(tmp_path):
    (tmp_path / "state" / FILE_NAME).mkdir(parents=True)  # a directory where the file should be
    host = Host(tmp_path)
    sampler = host.run(2)
    assert totals(sampler)[0] == 2 * 500.0
    assert ("load", "unreadable", 1) in host.store.status().errors


def test_a_failing_write_is_skipped_counted_said_once_and_retried(tmp_path, caplog):
    host = Host(tmp_path)
    sampler = host.run(2)
    host.storage.parent.mkdir(exist_ok=True)
    host.storage.write_text("a file where the directory should be")  # like a full or read-only disk: writes fail
    saver = PeriodicSaver(host.store, sampler.state_document, interval=3600)
    with caplog.at_level(logging.WARNING):
        assert not saver.save_now() and not saver.save_now()
    assert host.store.status().errors == (("save", "write", 2),)
    assert len([m for m in caplog.messages if "cannot save state" in m]) == 1
    host.storage.unlink()
    assert saver.save_now() and host.store.status().last_save is not None
    assert parse_state((host.storage / FILE_NAME).read_text()).gpus


def test_nothing_is_saved_before_the_first_round_so_a_quick_restart_loses_nothing(tmp_path):
    host = Host(tmp_path)
    host.save(host.run(5))
    before = (host.storage / FILE_NAME).read_bytes()
    sampler = Sampler(host.backend, grid=priced_grid(host.clock), clock=host.clock.time)
    sampler.start_backend()
    assert sampler.state_document() is None  # killed now, the previous file stays as it was
    assert PeriodicSaver(host.store, sampler.state_document).save_now() is False
    assert (host.storage / FILE_NAME).read_bytes() == before


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    host = Host(tmp_path)
    sampler = host.run(2)
    for _ in range(3):
        host.save(sampler)
    assert sorted(os.listdir(host.storage)) == [FILE_NAME]


def test_workload_totals_continue_across_a_restart():
    from wattson.accounting import StepCharge
    from wattson.energy import EnergyStep
    from wattson.gpu.base import GpuProcess, GpuReading
    from wattson.workloads.cgroup import ProcFS, UserNames, WorkloadResolver
    from wattson.workloads.tracker import WorkloadTracker

    fixtures = Path(__file__).parent / "fixtures" / "proc"
    now = [1_800_000_000.0]

    def tracker() -> WorkloadTracker:
        return WorkloadTracker(WorkloadResolver(ProcFS(str(fixtures)), UserNames(resolve=False)), 3600, 100,
                               clock=lambda: now[0])

    first = tracker()
    procs = tuple(GpuProcess(pid, 2**30, 0.5) for pid in (1001, 2002))
    reading = GpuReading(now[0], 0.0, 300.0, None, None, None, None, None, procs)
    for i in range(5):
        first.on_step(0, "GPU-a", EnergyStep(now[0] + i, now[0] + i + 1, 300.0),
                      StepCharge(300.0, (("EUR", 2.5e-5),), 0.03, ()), reading)
    saved = json.loads(json.dumps(first.export_state()))
    second = tracker()
    assert second.restore_state(saved) == 0
    assert second.snapshot(now[0]).series == first.snapshot(now[0]).series
    assert second.snapshot(now[0]).info == first.snapshot(now[0]).info
    second.on_step(0, "GPU-a", EnergyStep(now[0] + 5, now[0] + 6, 300.0),
                   StepCharge(300.0, (("EUR", 2.5e-5),), 0.03, ()), reading)
    assert sum(s.energy_joules for s in second.snapshot(now[0]).series) == pytest.approx(6 * 300.0)
    assert tracker().restore_state({"series": [["bad"], [0, "GPU-a", "pod", "x", "NaN", {}, {}, 0]]}) == 2


def test_restored_totals_stay_unexported_and_unsaved_until_a_reading_continues_them(tmp_path):
    from wattson.exposition import Exposition
    from wattson.gpu.base import GpuReadError

    host = Host(tmp_path)
    host.save(host.run(5))
    saved_entry = json.loads((host.storage / FILE_NAME).read_text())["gpus"][host.gpu.identity.uuid]
    host.clock.advance(10)
    host.gpu.fail_with = GpuReadError("gpu_lost", "GPU 0: lost")
    sampler = Sampler(host.backend, grid=priced_grid(host.clock), clock=host.clock.time)
    sampler.start_backend()
    store = StateStore(str(host.storage), clock=host.clock.time)
    saved = store.load({host.gpu.identity.uuid})
    assert saved is not None
    sampler.restore(saved)
    sampler.sample_round()
    text = Exposition().render(sampler.snapshot).text.decode()
    assert "wattson_gpu_energy_joules_total{" not in text and 'wattson_gpu_up{gpu="0"' in text
    doc = sampler.state_document()
    saved_entry.pop("index")
    assert doc is not None and doc["gpus"][host.gpu.identity.uuid] == saved_entry  # the file keeps the old entry
    host.gpu.fail_with = None
    host.clock.advance(1)
    sampler.sample_round()
    text = Exposition().render(sampler.snapshot).text.decode()
    assert f'wattson_gpu_energy_joules_total{{gpu="0",uuid="{host.gpu.identity.uuid}"}} {16 * 500.0}' in text
