"""The sampler: reads every GPU on an interval and publishes immutable snapshots.

Each GPU has its own worker thread, so a driver call that hangs on one GPU costs that GPU only:
the round waits at most `gpu_timeout_seconds`, marks the hung GPU down and goes on. Scrapes never
call NVML; they read `Sampler.snapshot`, which is replaced atomically after every round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import accounting
from .accounting import GpuAccount, StepCharge
from .config import SamplerConfig
from .energy import EnergyMeter, EnergyStep
from .gpu.base import BackendUnavailable, GpuBackend, GpuDevice, GpuReadError, GpuReading
from .grid.signal import GridSignals
from .snapshot import EMPTY, Budgets, GpuSnapshot, SignalNow, Snapshot, SourceSnapshot

log = logging.getLogger("wattson.sampler")

# Called after each accounted step with (gpu snapshot identity index, uuid, step, charge, reading).
StepListener = Callable[[int, str, EnergyStep, StepCharge, GpuReading], None]


@dataclass
class _Job:
    done: threading.Event
    started: float


class GpuWorker:
    """Owns one GPU's meter and account; its thread performs one read per submitted job."""

    def __init__(self, device: GpuDevice, max_power_watts: float, grid: GridSignals,
                 listeners: list[StepListener], clock: Callable[[], float]) -> None:
        self.device = device
        self.identity = device.identity
        self.meter = EnergyMeter(max_power_watts)
        self.account = GpuAccount()
        self.grid = grid
        self.listeners = listeners
        self.clock = clock
        self.errors: dict[str, int] = {}
        self.reinit_requested = False
        self.hung_reported = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._job: _Job | None = None
        self._stopping = False
        self.snapshot = GpuSnapshot(self.identity, False, None, 0.0, "unknown", ())
        self.thread = threading.Thread(target=self._run, name=f"gpu-{self.identity.index}", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> _Job | None:
        return self._job

    def submit(self) -> _Job | None:
        """Start one read; None if the previous read has not returned yet (hung)."""
        with self._lock:
            if self._job is not None:
                return None
            self._job = _Job(threading.Event(), time.monotonic())
            self._wake.notify()
            return self._job

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._job is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._job
            assert job is not None
            try:
                self._read_once()
            except Exception:  # never let one GPU's bug kill its thread silently
                log.exception("unexpected error reading GPU", extra={"kv": {"gpu": self.identity.index}})
                self._count("unknown")
                self._publish(up=False)
            finally:
                with self._lock:
                    self._job = None
                job.done.set()

    def _read_once(self) -> None:
        try:
            reading = self.device.read()
        except GpuReadError as exc:
            self._count(exc.kind)
            self.meter.gap()
            if exc.reinit:
                self.reinit_requested = True
            log.warning("GPU read failed", extra={"kv": {"gpu": self.identity.index, "uuid": self.identity.uuid,
                                                         "error": exc.kind, "err": str(exc)}})
            self._publish(up=False)
            return
        self.hung_reported = False
        step = self.meter.update(reading)
        if step is not None:
            if step.reset:
                self._count("counter_reset")
                log.warning("energy counter reset; step not counted",
                            extra={"kv": {"gpu": self.identity.index, "uuid": self.identity.uuid}})
            elif step.joules > 0:
                charge = accounting.charge(step, self.grid, self.clock())
                accounting.apply(self.account, charge)
                for listener in self.listeners:
                    listener(self.identity.index, self.identity.uuid, step, charge, reading)
        self._publish(up=True, reading=reading)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def _publish(self, up: bool, reading: GpuReading | None = None) -> None:
        prev = self.snapshot
        self.snapshot = GpuSnapshot(
            identity=self.identity,
            up=up,
            reading=reading if reading is not None else prev.reading,
            energy_joules=self.meter.total_joules,
            energy_method=self.meter.method or "unknown",
            errors=tuple(sorted(self.errors.items())),
            account=self.account.frozen(),
        )

    def mark_hung(self) -> None:
        """Called by the sampler when a read outlives the timeout; counted once per hang."""
        if not self.hung_reported:
            self.hung_reported = True
            self._count("hung")
            log.warning("GPU read hung; marking GPU down", extra={"kv": {"gpu": self.identity.index,
                                                                         "uuid": self.identity.uuid}})
        self.meter.gap()
        self._publish(up=False)

    def replace_device(self, device: GpuDevice) -> None:
        self.device = device
        self.reinit_requested = False

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()


class Sampler:
    def __init__(self, backend: GpuBackend, cfg: SamplerConfig, grid: GridSignals | None = None,
                 budgets: Budgets | None = None, clock: Callable[[], float] = time.time,
                 init_retry: tuple[float, float] = (1.0, 60.0)) -> None:
        self.backend = backend
        self.cfg = cfg
        self.grid = grid or GridSignals(carbon=None, price=None)
        self.budgets = budgets
        self.clock = clock
        self.listeners: list[StepListener] = []
        self.extra_families: list[Callable[[float], object]] = []
        self.workers: list[GpuWorker] = []
        self.snapshot: Snapshot = EMPTY
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_initial, self._retry_max = init_retry
        self._retry_delay = self._retry_initial
        self._next_reinit = 0.0
        self._backend_down = False

    def start_backend(self) -> None:
        """First initialisation; BackendUnavailable propagates so the CLI can exit 2."""
        devices = self.backend.start()
        self.workers = [self._worker(d) for d in devices]
        log.info("GPUs found", extra={"kv": {"backend": self.backend.name, "count": len(devices)}})

    def _worker(self, device: GpuDevice) -> GpuWorker:
        return GpuWorker(device, self.cfg.max_power_watts, self.grid, self.listeners, self.clock)

    def _reinit(self) -> None:
        """The driver went away: re-initialise with exponential backoff, keeping every total."""
        now = time.monotonic()
        if now < self._next_reinit:
            return
        try:
            devices = self.backend.restart()
        except BackendUnavailable as exc:
            self._next_reinit = now + self._retry_delay
            log.warning("GPU backend unavailable; will retry",
                        extra={"kv": {"err": str(exc), "retry_in_seconds": self._retry_delay}})
            self._retry_delay = min(self._retry_max, self._retry_delay * 2)
            self._backend_down = True
            return
        by_uuid = {w.identity.uuid: w for w in self.workers}
        for w in self.workers:
            # A GPU not found again keeps its stale device, which reports gpu_lost; asking for yet another
            # re-initialisation every round would not bring it back.
            w.reinit_requested = False
        for device in devices:
            worker = by_uuid.get(device.identity.uuid)
            if worker is not None:
                worker.replace_device(device)
            else:
                self.workers.append(self._worker(device))
        self._retry_delay = self._retry_initial
        self._backend_down = False
        log.info("GPU backend re-initialised", extra={"kv": {"count": len(devices)}})

    def sample_round(self) -> Snapshot:
        """One round: read every GPU (in parallel, bounded by the timeout) and publish a snapshot."""
        started = time.monotonic()
        if self._backend_down or any(w.reinit_requested for w in self.workers):
            self._reinit()
        jobs: list[tuple[GpuWorker, _Job]] = []
        if not self._backend_down:
            for w in self.workers:
                if w.reinit_requested:
                    continue  # its device handle is stale until re-initialisation succeeds
                job = w.submit()
                if job is None:
                    running = w.busy
                    if running is not None and started - running.started > self.cfg.gpu_timeout_seconds:
                        w.mark_hung()
                    continue
                jobs.append((w, job))
        deadline = started + self.cfg.gpu_timeout_seconds
        for w, job in jobs:
            if not job.done.wait(max(0.0, deadline - time.monotonic())):
                w.mark_hung()
        duration = time.monotonic() - started
        return self._publish(duration)

    def _publish(self, duration: float) -> Snapshot:
        now = self.clock()
        self._seq += 1
        signals, sources = grid_now(self.grid, now)
        self.snapshot = Snapshot(
            seq=self._seq,
            timestamp=now,
            duration_seconds=duration,
            backend=self.backend.name,
            ready=True,
            gpus=tuple(w.snapshot for w in sorted(self.workers, key=lambda w: w.identity.index)),
            signals=signals,
            sources=sources,
            pue=self.grid.pue,
            budgets=self.budgets,
            extra=tuple(f(now) for f in self.extra_families),
        )
        return self.snapshot

    def _run(self) -> None:
        interval = self.cfg.interval_seconds
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_round()
            except Exception:
                log.exception("sampling round failed")
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:  # fell behind (slow round): skip missed ticks, stay on the grid
                next_tick += interval * ((now - next_tick) // interval + 1)
            self._stop.wait(next_tick - now)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        for w in self.workers:
            w.stop()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop sampling. A round waits up to gpu_timeout_seconds for a hung GPU; shutdown waits at most
        `timeout` for it (the threads are daemons)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def reads_in_flight(self) -> bool:
        return any(w.busy is not None for w in self.workers)


def grid_now(grid: GridSignals, now: float) -> tuple[tuple[SignalNow, ...], tuple[SourceSnapshot, ...]]:
    """The signals in force at `now`, and each source's health, from the chains' immutable states."""
    signals: list[SignalNow] = []
    sources: dict[str, SourceSnapshot] = {}
    for chain in grid.chains:
        state = chain.state
        v = state.value_at(now, now)
        signals.append(SignalNow(
            signal=state.signal, zone=state.zone,
            value=v.value if v else None, currency=v.currency if v else None,
            source=v.source if v else None, estimated=bool(v and (v.interval.estimated or v.interval.forecast)),
            age_seconds=(now - v.fetched_at) if v else None,
            source_index=v.source_index if v else None,
        ))
        for st in state.statuses:
            # The same provider may serve both signals; its health is the worse of the two.
            prev = sources.get(st.name)
            errors = dict(prev.errors) if prev else {}
            for reason, n in st.errors.items():
                errors[reason] = errors.get(reason, 0) + n
            up = st.up if prev is None else (None if st.up is None and prev.up is None
                                             else bool(st.up is not False and prev.up is not False))
            last = max([x for x in (st.last_success, prev.last_success if prev else None) if x is not None],
                       default=None)
            sources[st.name] = SourceSnapshot(st.name, up, tuple(sorted(errors.items())), last)
    return tuple(signals), tuple(sources[k] for k in sorted(sources))
