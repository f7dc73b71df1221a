"""Durable state: what wattson has counted survives a restart, so its counters continue.

The state file (`<storage.path>/state.json`) holds, per GPU UUID, every exported total and the last
energy-counter reading with its wall time and counter epoch (boot and driver); per workload series,
its totals; the grid sources' cached intervals; and the host's day and month totals with the start of
their period (continued only by a start within that same period). It is written atomically (temporary
file, fsync, rename, fsync of the directory) every few seconds and at shutdown, from the immutable
snapshot, so writing never holds up sampling.

A state file that cannot be used (unreadable, not JSON, truncated, of another format version, of other
GPUs) is set aside next to it with a warning and wattson starts afresh; a write that fails (full disk,
no permission) is skipped with a warning. Both are counted in `wattson_storage_errors_total`. Neither
ever stops wattson.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logfmt import kv
from .periods import finite_number, state_entries
from .snapshot import Snapshot

log = logging.getLogger("wattson.state")

FORMAT = "wattson-state"
VERSION = 1
FILE_NAME = "state.json"
SAVE_INTERVAL_SECONDS = 5.0
MAX_STATE_BYTES = 64 * 1024 * 1024  # far above any real state; a bigger file is not ours

# Reasons of wattson_storage_errors_total{operation,reason}.
LOAD_REASONS = ("unreadable", "corrupt", "version", "foreign")
SAVE_REASONS = ("write",)


class StateError(Exception):
    """The state file cannot be used; `reason` is one of LOAD_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SavedGpu:
    """One GPU's totals and last energy-counter reading, as a previous run left them."""

    uuid: str
    energy_joules: float
    method: str | None
    cost: dict[str, float]
    credit: dict[str, float]
    co2e_grams: float
    unpriced_joules: dict[str, float]
    unmetered_seconds: float
    errors: dict[str, int]
    counter_epoch: str
    counter_millijoules: int | None
    reading_time: float | None  # wall time of the last reading (of the counter, when there is one)


@dataclass(frozen=True)
class SavedState:
    written_at: float
    gpus: dict[str, SavedGpu]
    workloads: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    periods: list[Any] = field(default_factory=list)  # period totals, checked entry by entry at restore


@dataclass(frozen=True)
class StorageStatus:
    """For the exposition: errors by (operation, reason) and the time of the last good save."""

    errors: tuple[tuple[str, str, int], ...]
    last_save: float | None


def _finite(value: Any, where: str) -> float:
    try:
        return finite_number(value, where)
    except ValueError as exc:
        raise StateError("corrupt", str(exc)) from None


def _amounts(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise StateError("corrupt", f"{where}: not an object")
    return {str(k): _finite(v, f"{where}.{k}") for k, v in value.items()}


def _gpu_from_json(uuid: str, d: Any) -> SavedGpu:
    where = f"gpus.{uuid}"
    if not isinstance(d, dict):
        raise StateError("corrupt", f"{where}: not an object")
    try:
        counter = d.get("counter_millijoules")
        if counter is not None and (isinstance(counter, bool) or not isinstance(counter, int) or counter < 0):
            raise StateError("corrupt", f"{where}.counter_millijoules: not a non-negative integer")
        reading_time = d.get("reading_time")
        method = d.get("method")
        if method not in (None, "counter", "integrated"):
            raise StateError("corrupt", f"{where}.method: {method!r}")
        errors = d.get("errors", {})
        if not isinstance(errors, dict) or not all(isinstance(v, int) and v >= 0 for v in errors.values()):
            raise StateError("corrupt", f"{where}.errors: not counts")
        return SavedGpu(
            uuid=uuid,
            energy_joules=_finite(d["energy_joules"], f"{where}.energy_joules"),
            method=method,
            cost=_amounts(d.get("cost", {}), f"{where}.cost"),
            credit=_amounts(d.get("credit", {}), f"{where}.credit"),
            co2e_grams=_finite(d.get("co2e_grams", 0.0), f"{where}.co2e_grams"),
            unpriced_joules=_amounts(d.get("unpriced_joules", {}), f"{where}.unpriced_joules"),
            unmetered_seconds=_finite(d.get("unmetered_seconds", 0.0), f"{where}.unmetered_seconds"),
            errors={str(k): int(v) for k, v in errors.items()},
            counter_epoch=str(d.get("counter_epoch", "")),
            counter_millijoules=counter,
            reading_time=None if reading_time is None else _finite(reading_time, f"{where}.reading_time"),
        )
    except KeyError as exc:
        raise StateError("corrupt", f"{where}: {exc.args[0]} missing") from None


def parse_state(text: str) -> SavedState:
    """A state file's content; StateError says why it cannot be used."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateError("corrupt", f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError("corrupt", "not a wattson state file")
    version = doc.get("version")
    if version != VERSION:
        raise StateError("version", f"format version {version!r}; this wattson reads version {VERSION}")
    gpus = doc.get("gpus")
    if not isinstance(gpus, dict):
        raise StateError("corrupt", "gpus: not an object")
    workloads = doc.get("workloads", {})
    grid = doc.get("grid", {})
    if not isinstance(workloads, dict) or not isinstance(grid, dict):
        raise StateError("corrupt", "workloads or grid: not an object")
    periods = doc.get("periods", [])
    return SavedState(written_at=_finite(doc.get("written_at"), "written_at"),
                      gpus={str(u): _gpu_from_json(str(u), g) for u, g in gpus.items()},
                      workloads=workloads, grid=grid, periods=periods if isinstance(periods, list) else [])


def state_from_snapshot(snap: Snapshot, counter_epoch: str, workloads: dict[str, Any],
                        grid: dict[str, Any], previous: SavedState | None, now: float) -> dict[str, Any]:
    """The JSON document for a snapshot. GPUs the snapshot does not have (not found since the restart) keep
    what the previous file said, so a GPU that comes back later still continues its totals."""
    gpus: dict[str, Any] = {}
    if previous is not None:
        gpus.update({u: _gpu_to_json(g) for u, g in previous.gpus.items()})
    for g in snap.gpus:
        if g.catching_up:
            continue  # not read since its totals were restored: the previous file's entry still holds
        r = g.reading
        gpus[g.identity.uuid] = {
            "index": g.identity.index,
            "energy_joules": g.energy_joules,
            "method": None if g.energy_method == "unknown" else g.energy_method,
            "cost": dict(g.account.cost),
            "credit": dict(g.account.credit),
            "co2e_grams": g.account.co2e_grams,
            "unpriced_joules": dict(g.account.unpriced_joules),
            "unmetered_seconds": g.unmetered_seconds,
            "errors": dict(g.errors),
            "counter_epoch": counter_epoch,
            "counter_millijoules": r.energy_millijoules if r is not None else None,
            "reading_time": r.timestamp if r is not None else None,
        }
    return {"format": FORMAT, "version": VERSION, "written_at": now, "host": socket.gethostname(),
            "gpus": gpus, "workloads": workloads, "grid": grid, "periods": state_entries(snap.periods)}


def _gpu_to_json(g: SavedGpu) -> dict[str, Any]:
    return {"energy_joules": g.energy_joules, "method": g.method, "cost": g.cost, "credit": g.credit,
            "co2e_grams": g.co2e_grams, "unpriced_joules": g.unpriced_joules,
            "unmetered_seconds": g.unmetered_seconds, "errors": g.errors, "counter_epoch": g.counter_epoch,
            "counter_millijoules": g.counter_millijoules, "reading_time": g.reading_time}


class StateStore:
    """Reads and writes the state file of one storage directory, counting what goes wrong."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.clock = clock
        self._lock = threading.Lock()
        self._errors: dict[tuple[str, str], int] = {}
        self._last_save: float | None = None
        self._save_failing: str | None = None  # the last save error said, to say it once until it changes

    def status(self) -> StorageStatus:
        with self._lock:
            return StorageStatus(tuple(sorted((op, r, n) for (op, r), n in self._errors.items())), self._last_save)

    def _count(self, operation: str, reason: str) -> None:
        with self._lock:
            self._errors[(operation, reason)] = self._errors.get((operation, reason), 0) + 1

    def load(self, gpu_uuids: set[str]) -> SavedState | None:
        """The previous run's state; None (after one warning, the file set aside) when there is none usable."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            log.info("no saved state; starting from zero", extra=kv(file=str(self.path)))
            return None
        except OSError as exc:
            return self._unusable(StateError("unreadable", f"cannot read: {exc.strerror or exc}"))
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise StateError("corrupt", f"larger than {MAX_STATE_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StateError("corrupt", f"not UTF-8 (byte {exc.start})") from None
            state = parse_state(text)
            if state.gpus and gpu_uuids and not (set(state.gpus) & gpu_uuids):
                raise StateError("foreign", f"none of its {len(state.gpus)} GPUs is on this host "
                                            "(a state file of another host)")
        except StateError as exc:
            return self._unusable(exc)
        log.info("state restored", extra=kv(file=str(self.path), gpus=len(state.gpus),
                                            saved_seconds_ago=round(self.clock() - state.written_at, 1)))
        return state

    def _unusable(self, exc: StateError) -> SavedState | None:
        self._count("load", exc.reason)
        aside = self.path.with_name(f"{FILE_NAME}.{exc.reason}-{int(self.clock())}")
        try:
            os.replace(self.path, aside)
            where = f"; set aside as {aside.name}"
        except OSError as move_exc:
            where = f"; could not set it aside: {move_exc.strerror or move_exc}"
        log.warning(f"state file not used; starting from zero{where}",
                    extra=kv(file=str(self.path), reason=exc.reason, err=str(exc)))
        return None

    def save(self, document: dict[str, Any]) -> bool:
        """Write atomically; False (counted, said once until it works again) when the write fails."""
        try:
            data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, ValueError) as exc:
            self._count("save", "write")
            text = str(getattr(exc, "strerror", None) or exc)
            if text != self._save_failing:
                self._save_failing = text
                log.warning("cannot save state; will retry", extra=kv(file=str(self.path), err=text))
            return False
        if self._save_failing is not None:
            log.info("state saved again", extra=kv(file=str(self.path)))
            self._save_failing = None
        with self._lock:
            self._last_save = self.clock()
        return True


class PeriodicSaver:
    """Saves `document()` every `interval` seconds from its own thread, and once more at stop()."""

    def __init__(self, store: StateStore, document: Callable[[], dict[str, Any] | None],
                 interval: float = SAVE_INTERVAL_SECONDS) -> None:
        self.store = store
        self.document = document
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def save_now(self) -> bool:
        try:
            document = self.document()
        except Exception:  # a bug building the document must not stop saving for good
            log.exception("building the state document failed")
            return False
        return document is not None and self.store.save(document)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.save_now()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and save the final state (the sampler has stopped: nothing changes any more)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.save_now()
