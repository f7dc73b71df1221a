"""The sampler: reads every GPU on an interval and publishes immutable snapshots.

One thread reads the GPUs of a round one after the other: the sampling loop's own thread, so a round
costs one timer wake-up however many GPUs there are. A driver call that hangs costs that GPU only:
when a read outlives `gpu_timeout_seconds`, the GPU is marked down (hung), the stuck thread is left
inside the driver and a fresh one carries on with the rest of the round (a watchdog notices in the
loop; the caller of `sample_round()` does outside it). The hung GPU is skipped until its call
returns. Scrapes never call NVML; they read `Sampler.snapshot`, replaced atomically after every round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import accounting
from .accounting import GpuAccount, StepCharge, Tariff
from .energy import EnergyMeter, EnergyStep
from .gpu.base import BackendUnavailable, GpuBackend, GpuDevice, GpuReadError, GpuReading
from .grid.signal import GridSignals
from .logfmt import kv
from .periods import HostPeriods
from .snapshot import EMPTY, Budgets, GpuSnapshot, Snapshot
from .state import SavedGpu, SavedState, StorageStatus, state_from_snapshot
from .workloads.snapshot import WorkloadSnapshot

log = logging.getLogger("wattson.sampler")


class WorkloadAccounting(Protocol):
    """What the sampler needs from per-workload accounting (kept optional: it is off by default)."""

    def on_step(self, gpu_index: int, uuid: str, step: EnergyStep, charge: StepCharge,
                reading: GpuReading) -> None:
        """Charge one accounted step of one GPU to the workloads that ran on it."""
        ...

    def snapshot(self, now: float) -> WorkloadSnapshot:
        """The workload totals as they stand after a round, immutable."""
        ...

    def export_state(self) -> dict[str, Any]: ...

    def restore_state(self, data: dict[str, Any]) -> int: ...


class GpuState:
    """One GPU's device, energy meter, account and last published snapshot."""

    def __init__(self, device: GpuDevice, max_power_watts: float, periods: HostPeriods | None = None) -> None:
        self.device = device
        self.periods = periods  # the host's period totals, shared by its GPUs (read one after the other)
        self.identity = device.identity
        self.meter = EnergyMeter(max_power_watts)
        self.account = GpuAccount()
        self.errors: dict[str, int] = {}
        self._errors_view: tuple[tuple[str, int], ...] = ()  # `errors` as published; rebuilt when it changes
        self.reinit_requested = False
        self.hung_reported = False
        self.read_since: float | None = None  # monotonic start of a driver call still in progress
        self.unmetered_seconds = 0.0  # time whose energy could not be known (after a reboot, for instance)
        self.catching_up = False  # restored totals not yet continued by a reading
        self.snapshot = GpuSnapshot(self.identity, False, None, 0.0, "unknown", ())

    def read(self) -> GpuReading | GpuReadError:
        """One driver read; never raises (a bug in a backend costs its GPU one reading)."""
        try:
            return self.device.read()
        except GpuReadError as exc:
            return exc
        except Exception as exc:
            log.exception("unexpected error reading GPU", extra=kv(gpu=self.identity.index))
            return GpuReadError("unknown", f"GPU {self.identity.index}: {type(exc).__name__}: {exc}")

    def record(self, outcome: GpuReading | GpuReadError, tariff: Tariff,
               workloads: WorkloadAccounting | None) -> None:
        """Account what one read returned and publish the GPU's new snapshot."""
        if isinstance(outcome, GpuReadError):
            self._count(outcome.kind)
            self.meter.gap()
            if outcome.reinit:
                self.reinit_requested = True
            log.warning("GPU read failed", extra=kv(gpu=self.identity.index, uuid=self.identity.uuid,
                                                    error=outcome.kind, err=str(outcome)))
            self._publish(up=False)
            return
        reading = outcome
        self.hung_reported = False
        step = self.meter.update(reading)
        self.catching_up = False
        if step is not None:
            if step.reset:
                self._count("counter_reset")
                log.warning("energy counter reset", extra=kv(gpu=self.identity.index, uuid=self.identity.uuid,
                                                             counted_joules=step.joules))
            if step.unmetered:
                self.unmetered_seconds += step.end - step.start
                log.info("time not metered", extra=kv(gpu=self.identity.index, uuid=self.identity.uuid,
                                                      seconds=round(step.end - step.start, 3)))
            if step.joules > 0:
                for piece, charge in accounting.account_step(self.account, step, tariff, self.periods):
                    if workloads is not None:
                        workloads.on_step(self.identity.index, self.identity.uuid, piece, charge, reading)
        self._publish(up=True, reading=reading)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self._errors_view = tuple(sorted(self.errors.items()))

    def _publish(self, up: bool, reading: GpuReading | None = None) -> None:
        prev = self.snapshot
        self.snapshot = GpuSnapshot(
            identity=self.identity,
            up=up,
            reading=reading if reading is not None else prev.reading,
            energy_joules=self.meter.total_joules,
            energy_method=self.meter.method or "unknown",
            errors=self._errors_view,
            account=self.account.frozen(),
            unmetered_seconds=self.unmetered_seconds,
            catching_up=self.catching_up,
        )

    def mark_hung(self) -> None:
        """A read outlived the timeout, or a GPU is still inside the call that did; counted once per hang."""
        if not self.hung_reported:
            self.hung_reported = True
            self._count("hung")
            log.warning("GPU read hung; marking GPU down", extra=kv(gpu=self.identity.index,
                                                                    uuid=self.identity.uuid))
        self.meter.gap()
        self._publish(up=False)

    def replace_device(self, device: GpuDevice) -> None:
        self.device = device
        self.reinit_requested = False

    def restore(self, saved: SavedGpu, counter_epoch: str) -> None:
        """Continue the totals a previous run saved; the time since its last reading is accounted by the
        first reading (see EnergyMeter.resume)."""
        self.account.restore(saved.cost, saved.credit, saved.co2e_grams, saved.unpriced_joules)
        self.errors = dict(saved.errors)
        self._errors_view = tuple(sorted(self.errors.items()))
        self.unmetered_seconds = saved.unmetered_seconds
        if saved.reading_time is not None:
            self.meter.resume(saved.energy_joules, saved.method, saved.counter_millijoules, saved.reading_time,
                              counter_runs_on=bool(counter_epoch) and saved.counter_epoch == counter_epoch)
        else:
            self.meter.total_joules = saved.energy_joules
        # Until a reading continues them, the saved totals may be lower than what was exported after the save:
        # they stay unexported (and unsaved) so that no scrape ever sees a counter go down.
        self.catching_up = True
        self._publish(up=False)


class _Round:
    """The GPUs one round reads, in order, and how far its current reader got. Guarded by `lock`.

    Whichever thread reads a round, a read that outlives the timeout is taken over the same way: its GPU is
    marked hung and skipped, and another thread carries on with the next GPU (`take_over`)."""

    def __init__(self, gpus: list[GpuState], tariff: Tariff, workloads: WorkloadAccounting | None,
                 grid: GridSignals, budgets: Budgets | None, started: float) -> None:
        self.gpus = gpus
        self.tariff = tariff
        self.workloads = workloads
        self.grid = grid
        self.budgets = budgets
        self.started = started
        self.position = 0  # the next GPU to read
        self.read_started: float | None = None  # monotonic start of the driver call in progress
        self.reader: object | None = None  # the reader whose results count; others were abandoned
        self.lock = threading.Lock()
        self.done = threading.Event()

    def read(self, reader: object) -> bool:
        """Read the GPUs from the current position on; False once `reader` was abandoned (its result of
        the hung read is then dropped: the GPU is read again next round, and its counter loses nothing)."""
        while True:
            with self.lock:
                if self.reader is not reader:
                    return False
                if self.position >= len(self.gpus):
                    self.done.set()
                    return True
                gpu = self.gpus[self.position]
                self.read_started = gpu.read_since = time.monotonic()
            outcome = gpu.read()
            with self.lock:
                gpu.read_since = None
                if self.reader is not reader:
                    return False
                self.read_started = None
                self.position += 1
            try:
                gpu.record(outcome, self.tariff, self.workloads)
            except Exception:  # accounting must never stop the round for the other GPUs
                log.exception("accounting a GPU reading failed", extra=kv(gpu=gpu.identity.index))

    def seconds_to_overdue(self, timeout: float) -> float:
        """How long the read in progress may still take (`timeout` when none is in progress)."""
        started = self.read_started
        return timeout if started is None else started + timeout - time.monotonic()

    def take_over(self, timeout: float) -> GpuState | None:
        """If the read in progress outlived `timeout`: abandon its reader, skip its GPU and return it
        (marked down); the caller then hands the rest of the round to another reader. None while the
        reads keep their time."""
        with self.lock:
            started = self.read_started
            if self.done.is_set() or started is None or time.monotonic() - started <= timeout:
                return None
            hung = self.gpus[self.position]
            self.position += 1
            self.read_started = None
            self.reader = None
        hung.mark_hung()
        return hung

    def hand_to(self, reader: object) -> None:
        with self.lock:
            self.reader = reader


class _Reader:
    """A thread that reads the rounds `Sampler.sample_round()` hands it. Abandoned, never reused, once a
    driver call hangs in it: it then only leaves the driver, drops that result and exits."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._round: _Round | None = None
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, rnd: _Round) -> None:
        with self._wake:
            self._round = rnd
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._round is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                rnd, self._round = self._round, None
            assert rnd is not None
            if not rnd.read(self):
                return


class Sampler:
    def __init__(self, backend: GpuBackend, *, interval_seconds: float = 1.0, gpu_timeout_seconds: float = 2.0,
                 max_power_watts: float = 3000.0, grid: GridSignals | None = None,
                 budgets: Budgets | None = None, clock: Callable[[], float] = time.time,
                 init_retry: tuple[float, float] = (1.0, 60.0), period_offsets: Sequence[int] = (0,)) -> None:
        self.backend = backend
        self.interval_seconds = interval_seconds
        self.gpu_timeout_seconds = gpu_timeout_seconds
        self.max_power_watts = max_power_watts
        self.clock = clock
        self.workloads: WorkloadAccounting | None = None
        self.storage: Callable[[], StorageStatus] | None = None  # the state store's health, when state is kept
        self.last_round_monotonic = time.monotonic()  # when the last round completed (or the sampler was made)
        self.gpus: list[GpuState] = []
        self.periods = HostPeriods(period_offsets)  # day and month totals in UTC and the configured offset
        self.snapshot: Snapshot = EMPTY
        self._grid = grid or GridSignals(carbon=None, price=None)
        self._budgets = budgets
        self._config_lock = threading.Lock()  # grid and budgets are swapped whole, between rounds
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._readers = 0
        self._reader: _Reader | None = None  # serves sample_round(); the loop reads in its own thread
        self._loops = 0
        self._current: _Round | None = None  # the loop's round in progress, watched for hung reads
        self._retry_initial, self._retry_max = init_retry
        self._retry_delay = self._retry_initial
        self._next_reinit = 0.0
        self._backend_down = False
        self._saved: SavedState | None = None

    @property
    def grid(self) -> GridSignals:
        return self._grid

    @property
    def budgets(self) -> Budgets | None:
        return self._budgets

    def replace_grid(self, grid: GridSignals, budgets: Budgets | None) -> GridSignals:
        """Swap the grid signals and budgets (a reload); returns the old grid for the caller to stop.
        The next round prices with the new grid; a round in progress finishes with the old one."""
        with self._config_lock:
            old, self._grid, self._budgets = self._grid, grid, budgets
        return old

    def restore(self, saved: SavedState) -> None:
        """Continue a previous run: GPUs are matched by UUID; workload totals go to the workload tracker."""
        self._saved = saved
        restored = sum(self._restore_gpu(g) for g in self.gpus)
        bad_periods = self.periods.restore(saved.periods, self.clock())
        if bad_periods:
            log.warning("saved period totals skipped (malformed)", extra=kv(entries=bad_periods))
        if self.workloads is not None and saved.workloads:
            bad = self.workloads.restore_state(saved.workloads)
            if bad:
                log.warning("saved workload entries skipped (malformed)", extra=kv(entries=bad))
        log.info("totals continued from the saved state", extra=kv(gpus=restored))

    def _restore_gpu(self, gpu: GpuState) -> bool:
        """Continue one GPU's saved totals, at start or when a GPU missing then is found at a re-initialisation."""
        prev = self._saved.gpus.get(gpu.identity.uuid) if self._saved is not None else None
        if prev is None:
            return False
        gpu.restore(prev, self.backend.counter_epoch)
        return True

    def state_document(self) -> dict[str, Any] | None:
        """What the state file should hold now; None until a round completed (nothing new to save)."""
        snap = self.snapshot
        if not snap.ready:
            return None
        workloads = self.workloads.export_state() if self.workloads is not None else (
            self._saved.workloads if self._saved is not None else {})
        return state_from_snapshot(snap, self.backend.counter_epoch, workloads, self.grid.export_state(),
                                   self._saved, self.clock())

    def start_backend(self) -> None:
        """First initialisation; BackendUnavailable propagates so the CLI can exit 2."""
        devices = self.backend.start()
        self.gpus = sorted((GpuState(d, self.max_power_watts, self.periods) for d in devices),
                           key=lambda g: g.identity.index)
        log.info("GPUs found", extra=kv(backend=self.backend.name, count=len(devices)))

    def _reinit(self) -> None:
        """The driver went away: re-initialise with exponential backoff, keeping every total."""
        now = time.monotonic()
        if now < self._next_reinit:
            return
        try:
            devices = self.backend.restart()
        except BackendUnavailable as exc:
            self._next_reinit = now + self._retry_delay
            log.warning("GPU backend unavailable; will retry", extra=kv(err=str(exc),
                                                                        retry_in_seconds=self._retry_delay))
            self._retry_delay = min(self._retry_max, self._retry_delay * 2)
            self._backend_down = True
            return
        by_uuid = {g.identity.uuid: g for g in self.gpus}
        for g in self.gpus:
            # A GPU not found again keeps its stale device, which reports gpu_lost; asking for yet another
            # re-initialisation every round would not bring it back.
            g.reinit_requested = False
        for device in devices:
            gpu = by_uuid.get(device.identity.uuid)
            if gpu is not None:
                gpu.replace_device(device)
            else:
                gpu = GpuState(device, self.max_power_watts, self.periods)
                if self._restore_gpu(gpu):
                    log.info("GPU found again continues its saved totals", extra=kv(gpu=gpu.identity.index,
                                                                                    uuid=gpu.identity.uuid))
                self.gpus.append(gpu)
        self.gpus.sort(key=lambda g: g.identity.index)
        self._retry_delay = self._retry_initial
        self._backend_down = False
        log.info("GPU backend re-initialised", extra=kv(count=len(devices)))

    def _begin(self) -> _Round:
        """Start a round: re-initialise the backend if asked, take the grid as it stands, pick the GPUs."""
        started = time.monotonic()
        if self._backend_down or any(g.reinit_requested for g in self.gpus):
            self._reinit()
        with self._config_lock:
            grid, budgets = self._grid, self._budgets
        to_read: list[GpuState] = []
        if not self._backend_down:
            for g in self.gpus:
                if g.reinit_requested:
                    continue  # its device handle is stale until re-initialisation succeeds
                since = g.read_since
                if since is not None:  # still inside a driver call from an earlier round
                    if started - since > self.gpu_timeout_seconds:
                        g.mark_hung()
                    continue
                to_read.append(g)
        return _Round(to_read, Tariff(grid, self.clock()), self.workloads, grid, budgets, started)

    def sample_round(self) -> Snapshot:
        """One round now, outside the sampling loop (tests, benchmarks): the reads run on a reader thread,
        and the caller takes the round over from it when a read hangs, so a hung GPU costs it
        gpu_timeout_seconds at most."""
        rnd = self._begin()
        if rnd.gpus:
            timeout = self.gpu_timeout_seconds
            reader = self._reader or self._new_reader()
            rnd.hand_to(reader)
            reader.submit(rnd)
            while not rnd.done.wait(max(0.0, rnd.seconds_to_overdue(timeout))):
                if rnd.take_over(timeout) is not None:  # the rest of the round goes to a fresh reader
                    reader = self._new_reader()
                    rnd.hand_to(reader)
                    reader.submit(rnd)
        return self._finish(rnd)

    def _new_reader(self) -> _Reader:
        self._readers += 1
        self._reader = _Reader(f"gpu-reader-{self._readers}")
        return self._reader

    def _finish(self, rnd: _Round) -> Snapshot:
        now = self.clock()
        self._seq += 1
        signals, sources = rnd.grid.now(now)
        self.snapshot = Snapshot(
            seq=self._seq,
            timestamp=now,
            duration_seconds=time.monotonic() - rnd.started,
            backend=self.backend.name,
            ready=True,
            gpus=tuple(g.snapshot for g in self.gpus),
            signals=signals,
            sources=sources,
            pue=rnd.grid.pue,
            budgets=rnd.budgets,
            workloads=self.workloads.snapshot(now) if self.workloads is not None else None,
            storage=self.storage() if self.storage is not None else None,
            forecasts=rnd.grid.best_windows(now),
            periods=self.periods.snapshot(now),
        )
        self.last_round_monotonic = time.monotonic()
        return self.snapshot

    # -- the sampling loop -----------------------------------------------------------------------------
    # The loop thread reads the GPUs itself, so a round costs one timer wake-up. A watchdog looks at the
    # round in progress a few times per gpu_timeout_seconds; when a read has outlived the timeout it marks
    # the GPU hung and starts a new loop thread that finishes the round and carries on. The stuck thread
    # leaves the driver whenever its call returns, drops its result and exits.

    def start(self) -> None:
        self._start_loop(None)
        threading.Thread(target=self._watch, name="sampler-watchdog", daemon=True).start()

    def _start_loop(self, resume: _Round | None) -> None:
        self._loops += 1
        reader = object()
        if resume is not None:
            resume.hand_to(reader)
        thread = threading.Thread(target=self._loop, args=(reader, resume), daemon=True,
                                  name="sampler" if self._loops == 1 else f"sampler-{self._loops}")
        self._thread = thread
        thread.start()

    def _loop(self, reader: object, resume: _Round | None) -> None:
        rnd = resume
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                if rnd is None:
                    rnd = self._begin()
                    rnd.hand_to(reader)
                    self._current = rnd
                if not rnd.read(reader):
                    return  # abandoned inside a hung driver call: the watchdog's new loop carries on
                self._finish(rnd)
            except Exception:
                log.exception("sampling round failed")
            rnd = None
            next_tick += self.interval_seconds
            now = time.monotonic()
            if next_tick < now:  # fell behind (slow round): skip missed ticks, stay on the grid
                next_tick += self.interval_seconds * ((now - next_tick) // self.interval_seconds + 1)
            self._stop.wait(next_tick - now)

    def _watch(self) -> None:
        while not self._stop.wait(self.gpu_timeout_seconds / 4):
            rnd = self._current
            if rnd is not None and rnd.take_over(self.gpu_timeout_seconds) is not None:
                self._start_loop(rnd)

    def request_stop(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.stop()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop sampling. A round waits up to gpu_timeout_seconds for a hung GPU; shutdown waits at most
        `timeout` for it (the threads are daemons)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def reads_in_flight(self) -> bool:
        return any(g.read_since is not None for g in self.gpus)
