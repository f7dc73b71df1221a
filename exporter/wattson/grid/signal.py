"""Fallback chains, polling and lookup by time for the two grid signals.

One `SignalChain` per signal (carbon, price) owns its sources, polls each on its own schedule
from its own poller thread (so a slow provider never delays its fallback; one fetch per source
shared by all GPUs), keeps the last good intervals of each, and answers "which value was in force
at time t" from an immutable `ChainState` that is swapped atomically, so lookups from the sampler
take no lock and never touch the network. `GridSignals.now` turns the chains' states into the
snapshot's view: each signal as it stands, and each source's health.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..logfmt import kv
from .base import ERROR_REASONS, FetchResult, GridSource, Interval, Signal, SourceError
from .http import redact

log = logging.getLogger("wattson.grid")

MAX_BACKOFF_SECONDS = 900.0
MIN_BACKOFF_SECONDS = 5.0
# Values outside these are rejected as absurd even if a source let them through.
VALUE_BOUNDS: dict[str, tuple[float, float]] = {"carbon": (0.0, 5000.0), "price": (-100.0, 100.0)}


@dataclass(frozen=True)
class SourceCache:
    """The last good data of one source, with its values already in exported units."""

    intervals: tuple[Interval, ...]
    starts: tuple[float, ...]
    currency: str | None
    fetched_at: float

    @classmethod
    def from_result(cls, result: FetchResult, fetched_at: float,
                    transform: Callable[[float], float] = lambda v: v) -> SourceCache:
        # Providers repeat slots (history next to forecast): per start time, measured data beats a
        # forecast, and a later entry of the same kind beats an earlier one.
        best: dict[float, Interval] = {}
        for iv in result.intervals:
            cur = best.get(iv.start)
            if cur is None or not (iv.forecast and not cur.forecast):
                best[iv.start] = iv
        ivs = tuple(Interval(i.start, i.end, transform(i.value), i.estimated, i.forecast)
                    for _, i in sorted(best.items()))
        return cls(ivs, tuple(i.start for i in ivs), result.currency, fetched_at)

    def at(self, t: float) -> Interval | None:
        idx = bisect.bisect_right(self.starts, t) - 1
        # Intervals rarely overlap; looking back a few covers a long interval followed by short ones.
        for j in range(idx, max(-1, idx - 4), -1):
            if self.intervals[j].contains(t):
                return self.intervals[j]
        return None

    def next_start_after(self, t: float) -> float | None:
        idx = bisect.bisect_right(self.starts, t)
        return self.starts[idx] if idx < len(self.starts) else None


@dataclass(frozen=True)
class SourceStatus:
    name: str
    up: bool | None  # None = not tried yet
    errors: dict[str, int]  # reason -> count
    last_success: float | None
    last_error: str | None


@dataclass(frozen=True)
class Value:
    """A signal value that was in force at some time, and where it came from."""

    value: float
    source: str
    interval: Interval
    currency: str | None
    fetched_at: float
    source_index: int = 0  # position in the fallback chain; 0 = the preferred source


@dataclass(frozen=True)
class ChainState:
    signal: Signal
    zone: str
    max_age: float
    sources: tuple[str, ...]
    caches: tuple[SourceCache | None, ...]
    statuses: tuple[SourceStatus, ...]

    def value_at(self, t: float, now: float) -> Value | None:
        """The value in force at `t` from the first source of the chain whose data covers `t` and is
        fresh (fetched within max_age of `now`)."""
        for index, (name, cache) in enumerate(zip(self.sources, self.caches, strict=True)):
            if cache is None or now - cache.fetched_at > self.max_age:
                continue
            iv = cache.at(t)
            if iv is not None:
                return Value(iv.value, name, iv, cache.currency, cache.fetched_at, index)
        return None

    def split(self, t0: float, t1: float, now: float) -> list[tuple[float, Value | None]]:
        """Split [t0, t1) into pieces by the interval (and source) in force, as (fraction, value).

        Fractions add up to exactly 1 so an energy step is never lost or counted twice; a boundary
        shared by two intervals belongs to the later one (intervals are half-open)."""
        span = t1 - t0
        if span <= 0:
            return [(1.0, self.value_at(t1, now))]
        first = self.value_at(t0, now)
        if first is not None and first.source_index == 0 and t1 <= first.interval.end:
            return [(1.0, first)]  # the usual case: the whole step inside one interval of the preferred source
        pieces: list[tuple[float, Value | None]] = []
        t = t0
        while t < t1:
            v = self.value_at(t, now)
            # The piece ends where its interval ends or where any source's next interval starts,
            # whichever is first: a higher-priority source may take over there.
            ends = [t1] + ([v.interval.end] if v is not None else [])
            ends += [n for c in self.caches if c is not None for n in [c.next_start_after(t)] if n is not None]
            end = min(ends)
            if end <= t:  # defensive: never loop forever on degenerate data
                end = t1
            pieces.append(((end - t) / span, v))
            t = end
        total = sum(f for f, _ in pieces)
        if pieces and total != 1.0:
            f, v = pieces[-1]
            pieces[-1] = (f + (1.0 - total), v)
        return pieces


class SignalChain:
    """Polls the sources of one signal, each from its own thread (a slow provider never delays its
    fallback), and publishes ChainState snapshots."""

    def __init__(self, signal: Signal, zone: str, max_age: float, sources: list[GridSource],
                 transforms: list[Callable[[float], float]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.signal = signal
        self.zone = zone
        self.max_age = max_age
        self.sources = sources
        self.transforms = transforms or [lambda v: v for _ in sources]
        self.clock = clock
        self._lock = threading.Lock()  # serialises writers only; readers use self.state
        self._errors: list[dict[str, int]] = [{} for _ in sources]
        self._statuses = [SourceStatus(s.name, None, {}, None, None) for s in sources]
        self._next_poll = [0.0 for _ in sources]
        self._failures = [0 for _ in sources]
        self.state = ChainState(signal, zone, max_age, tuple(s.name for s in sources),
                                tuple(None for _ in sources), tuple(self._statuses))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rng = random.Random()

    def poll_interval(self, source: GridSource) -> float:
        # Poll often enough that a working source never looks stale.
        return min(source.poll_interval_seconds, self.max_age / 2)

    def poll_due(self) -> None:
        """Fetch every source whose time has come, in turn. Tests call it directly."""
        for i in range(len(self.sources)):
            self._poll_if_due(i)

    def _poll_if_due(self, i: int) -> None:
        now = self.clock()
        if now >= self._next_poll[i]:
            self._poll(i, self.sources[i], now)

    def _poll(self, i: int, source: GridSource, now: float) -> None:
        try:
            result = source.fetch(now)
            cache = SourceCache.from_result(result, now, self.transforms[i])
            self._validate(source, cache)
        except SourceError as exc:
            self._record_failure(i, source, exc.reason, str(exc), exc.retry_after, now)
            return
        except Exception as exc:  # a bug in one source must not stop the others
            self._record_failure(i, source, "malformed", f"{source.name}: unexpected {type(exc).__name__}: {exc}",
                                 None, now)
            return
        self._failures[i] = 0
        delay = result.next_poll_seconds if result.next_poll_seconds is not None else self.poll_interval(source)
        self._next_poll[i] = now + max(1.0, min(delay, self.poll_interval(source)))
        status = SourceStatus(source.name, True, dict(self._errors[i]), now, None)
        self._publish(i, status, cache)
        log.debug("source fetched", extra=kv(source=source.name, signal=self.signal,
                                             intervals=len(cache.intervals)))

    def _validate(self, source: GridSource, cache: SourceCache) -> None:
        if not cache.intervals:
            raise SourceError("no_data", f"{source.name}: response held no usable intervals")
        low, high = VALUE_BOUNDS[self.signal]
        for iv in cache.intervals:
            if iv.end <= iv.start:
                raise SourceError("malformed", f"{source.name}: interval ends before it starts at {iv.start:.0f}")
            if not low <= iv.value <= high:
                raise SourceError("invalid_value", f"{source.name}: {self.signal} value {iv.value:g} "
                                  f"outside [{low:g}, {high:g}] at {iv.start:.0f}")
        if self.signal == "price" and not cache.currency:
            raise SourceError("missing_field", f"{source.name}: price source returned no currency")

    def _record_failure(self, i: int, source: GridSource, reason: str, message: str,
                        retry_after: float | None, now: float) -> None:
        reason = reason if reason in ERROR_REASONS else "malformed"
        self._errors[i][reason] = self._errors[i].get(reason, 0) + 1
        self._failures[i] += 1
        base = min(MAX_BACKOFF_SECONDS, MIN_BACKOFF_SECONDS * 2 ** (self._failures[i] - 1),
                   self.poll_interval(source))
        # Equal jitter: half the backoff is kept, the other half drawn at random. The kept half still backs
        # off; the random half keeps a fleet from polling in step.
        delay = base / 2 + self._rng.uniform(0.0, base / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._next_poll[i] = now + delay
        message = redact(message, source.secrets())
        prev = self.state.statuses[i]
        status = SourceStatus(source.name, False, dict(self._errors[i]), prev.last_success, message)
        self._publish(i, status, None)
        log.warning("source fetch failed", extra=kv(source=source.name, signal=self.signal, reason=reason,
                                                    err=message, retry_in_seconds=round(delay, 1)))

    def _publish(self, i: int, status: SourceStatus, cache: SourceCache | None) -> None:
        with self._lock:
            caches = list(self.state.caches)
            if cache is not None:
                caches[i] = cache
            statuses = list(self.state.statuses)
            statuses[i] = status
            self.state = ChainState(self.signal, self.zone, self.max_age, self.state.sources,
                                    tuple(caches), tuple(statuses))

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            self._poll_if_due(i)
            wait = max(0.2, self._next_poll[i] - self.clock())
            self._stop.wait(min(wait, 5.0))

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"grid-{self.signal}-{s.name}",
                                          daemon=True) for i, s in enumerate(self.sources)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Ask the pollers to stop. A fetch in flight may take up to its timeout; the threads are daemons,
        so shutdown does not wait for them."""
        self._stop.set()


@dataclass(frozen=True)
class SignalNow:
    """A grid signal as it stands at one moment."""

    signal: str
    zone: str
    value: float | None  # None = unknown: the gauge is then absent, never 0
    currency: str | None
    source: str | None
    estimated: bool
    age_seconds: float | None
    source_index: int | None = None  # position of `source` in the chain; > 0 means a fallback serves


@dataclass(frozen=True)
class SourceSnapshot:
    """One source's health in one chain. The key is (signal, source): the same provider type in the
    carbon and the price chain (two `static` sources, say) are two sources, never merged."""

    signal: str
    source: str
    up: bool | None  # None = not tried yet
    errors: tuple[tuple[str, int], ...]  # (reason, count), sorted by reason
    last_success: float | None


def _merge(a: SourceSnapshot, b: SourceSnapshot) -> SourceSnapshot:
    """Two sources of the same type in one chain share one health series: the worse of the two."""
    errors = dict(a.errors)
    for reason, n in b.errors:
        errors[reason] = errors.get(reason, 0) + n
    up = None if a.up is None and b.up is None else (a.up is not False and b.up is not False)
    last = max((x for x in (a.last_success, b.last_success) if x is not None), default=None)
    return SourceSnapshot(a.signal, a.source, up, tuple(sorted(errors.items())), last)


@dataclass
class GridSignals:
    """The configured chains (either may be absent) plus the PUE."""

    pue: float = 1.0
    carbon: SignalChain | None = None
    price: SignalChain | None = None
    chains: list[SignalChain] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chains = [c for c in (self.carbon, self.price) if c is not None]

    def now(self, t: float) -> tuple[tuple[SignalNow, ...], tuple[SourceSnapshot, ...]]:
        """The signals in force at `t` and each source's health, read from the chains' immutable states
        (no lock, no network), ordered by signal and source."""
        signals: list[SignalNow] = []
        sources: dict[tuple[str, str], SourceSnapshot] = {}
        for chain in self.chains:
            state = chain.state
            v = state.value_at(t, t)
            signals.append(SignalNow(
                signal=state.signal, zone=state.zone,
                value=v.value if v else None, currency=v.currency if v else None,
                source=v.source if v else None, estimated=bool(v and (v.interval.estimated or v.interval.forecast)),
                age_seconds=(t - v.fetched_at) if v else None,
                source_index=v.source_index if v else None,
            ))
            for st in state.statuses:
                snap = SourceSnapshot(state.signal, st.name, st.up, tuple(sorted(st.errors.items())), st.last_success)
                key = (state.signal, st.name)
                sources[key] = _merge(sources[key], snap) if key in sources else snap
        return tuple(signals), tuple(sources[k] for k in sorted(sources))

    def start(self) -> None:
        for c in self.chains:
            c.start()

    def stop(self) -> None:
        for c in self.chains:
            c.stop()
