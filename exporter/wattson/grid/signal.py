"""Fallback chains, polling and lookup by time for the two grid signals.

One `SignalChain` per signal (carbon, price) owns its sources, polls each on its own schedule
from its own poller thread (so a slow provider never delays its fallback; one fetch per source
shared by all GPUs), keeps the last good intervals of each, and answers "which value was in force
at time t" from an immutable `ChainState` that is swapped atomically, so lookups from the sampler
take no lock and never touch the network. `GridSignals.now` turns the chains' states into the
snapshot's view: each signal as it stands, and each source's health.

What a chain knows about a source (its data, counters, health and schedule) outlives the chain: a reload
hands it to the new chain when the source's config did not change (`SignalChain.adopt_from`), and a
restart reads it back from the state file (`GridSignals.export_state` / `restore_state`).
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ..logfmt import kv
from . import state as saved
from .base import ERROR_REASONS, FetchResult, GridSource, Interval, MissingSecret, Signal, SourceError
from .forecast import DEFAULT_WINDOWS, ForecastCache, SignalForecast, parse_windows
from .http import redact
from .limits import MAX_GRAMS_PER_KWH, max_abs_price_per_kwh

log = logging.getLogger("wattson.grid")

MAX_BACKOFF_SECONDS = 900.0
MIN_BACKOFF_SECONDS = 5.0
SIGNALS: tuple[Signal, ...] = ("carbon", "price")


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
        ivs = tuple(Interval(i.start, i.end, transform(i.value), i.estimated, i.forecast, i.origin)
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
class SourceRuntime:
    """Everything a chain knows about one source beyond its config: what a reload carries over."""

    cache: SourceCache | None
    status: SourceStatus
    failures: int  # failed fetches in a row
    next_poll: float  # UNIX time of the next fetch
    down_since: float | None  # first failure of the current run of failures
    secret_warned: bool  # the missing API key was logged at warning level already


@dataclass(frozen=True)
class Value:
    """A signal value that was in force at some time, and where it came from."""

    value: float
    source: str
    interval: Interval
    currency: str | None
    fetched_at: float
    source_index: int = 0  # position in the fallback chain; 0 = the preferred source

    @property
    def origin(self) -> str:
        """The upstream source of the value: the relayed one behind a grid hub, else `source` itself."""
        return self.interval.origin or self.source


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
            end = self._piece_end(t, t1, v)
            pieces.append(((end - t) / span, v))
            t = end
        total = sum(f for f, _ in pieces)
        if pieces and total != 1.0:
            f, v = pieces[-1]
            pieces[-1] = (f + (1.0 - total), v)
        return pieces

    def _piece_end(self, t: float, t1: float, v: Value | None) -> float:
        """Where the piece starting at `t` (served by `v`) ends: where its interval ends or where any
        source's next interval starts, whichever is first (a higher-priority source may take over there)."""
        ends = [t1] + ([v.interval.end] if v is not None else [])
        ends += [n for c in self.caches if c is not None for n in [c.next_start_after(t)] if n is not None]
        end = min(ends)
        return end if end > t else t1  # defensive: never loop forever on degenerate data

    def timeline(self, t0: float, t1: float, now: float,
                 max_pieces: int = 20_000) -> list[tuple[float, float, Value]]:
        """[t0, t1) as the chain serves it, judged at `now`: (start, end, value) pieces cut exactly where
        `split` cuts them, time without any value left out, and neighbours that are the same interval of the
        same source joined. What a grid hub serves its hosts, so they price with what this chain would."""
        out: list[tuple[float, float, Value]] = []
        t = t0
        while t < t1 and len(out) < max_pieces:
            v = self.value_at(t, now)
            end = self._piece_end(t, t1, v)
            if v is not None:
                if out and out[-1][1] == t and out[-1][2].source_index == v.source_index \
                        and out[-1][2].interval == v.interval:
                    out[-1] = (out[-1][0], end, out[-1][2])
                else:
                    out.append((t, end, v))
            t = end
        return out


class SignalChain:
    """Polls the sources of one signal, each from its own thread (a slow provider never delays its
    fallback), and publishes ChainState snapshots.

    `configs` are the sources' config models (None for a source built without one, as in tests): they
    identify a source across a reload or a restart, and carry its `max_abs_price_per_kwh`."""

    def __init__(self, signal: Signal, zone: str, max_age: float, sources: list[GridSource],
                 transforms: list[Callable[[float], float]] | None = None,
                 clock: Callable[[], float] = time.time, configs: Sequence[Any] | None = None) -> None:
        self.signal = signal
        self.zone = zone
        self.max_age = max_age
        self.sources = sources
        self.transforms = transforms or [lambda v: v for _ in sources]
        self.clock = clock
        self.configs: tuple[Any, ...] = tuple(configs) if configs is not None else tuple(None for _ in sources)
        if len(self.configs) != len(sources):
            raise ValueError("one config per source")
        self._digests = tuple(saved.config_digest(c) for c in self.configs)
        self._price_limits = tuple(getattr(c, "max_abs_price_per_kwh", None) for c in self.configs)
        # Writers (each source's poller, adoption, restore) change a source's fields and publish under this
        # lock; readers use self.state and take none.
        self._lock = threading.Lock()
        self._errors: list[dict[str, int]] = [{} for _ in sources]
        self._next_poll = [0.0 for _ in sources]
        self._failures = [0 for _ in sources]
        self._down_since: list[float | None] = [None for _ in sources]
        self._secret_warned = [False for _ in sources]
        self.state = ChainState(signal, zone, max_age, tuple(s.name for s in sources),
                                tuple(None for _ in sources),
                                tuple(SourceStatus(s.name, None, {}, None, None) for s in sources))
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
            self._validate(i, source, cache)
        except SourceError as exc:
            self._record_failure(i, source, exc, now)
            return
        except Exception as exc:  # a bug in one source must not stop the others
            self._record_failure(i, source, SourceError(
                "malformed", f"{source.name}: unexpected {type(exc).__name__}: {exc}"), now)
            return
        delay = result.next_poll_seconds if result.next_poll_seconds is not None else self.poll_interval(source)
        with self._lock:
            failures, down_since = self._failures[i], self._down_since[i]
            self._failures[i], self._down_since[i], self._secret_warned[i] = 0, None, False
            self._next_poll[i] = now + max(1.0, min(delay, self.poll_interval(source)))
            status = SourceStatus(source.name, True, dict(self._errors[i]), now, None)
            self._publish(i, status, cache)
        if failures:
            log.info("source recovered", extra=kv(
                source=source.name, signal=self.signal, failures=failures,
                down_seconds=round(now - down_since, 1) if down_since is not None else None))
        log.debug("source fetched", extra=kv(source=source.name, signal=self.signal,
                                             intervals=len(cache.intervals)))

    def price_limit(self, i: int, currency: str | None) -> float:
        """The largest |price| per kWh source `i` may export in `currency`."""
        return max_abs_price_per_kwh(currency, self._price_limits[i])

    def _validate(self, i: int, source: GridSource, cache: SourceCache) -> None:
        if not cache.intervals:
            raise SourceError("no_data", f"{source.name}: response held no usable intervals")
        if self.signal == "price" and not cache.currency:
            raise SourceError("missing_field", f"{source.name}: price source returned no currency")
        if self.signal == "carbon":
            low, high = 0.0, MAX_GRAMS_PER_KWH
        else:
            limit = self.price_limit(i, cache.currency)
            low, high = -limit, limit
        for iv in cache.intervals:
            if iv.end <= iv.start:
                raise SourceError("malformed", f"{source.name}: interval ends before it starts at {iv.start:.0f}")
            if not low <= iv.value <= high:
                raise SourceError("invalid_value", f"{source.name}: {self.signal} value {iv.value:g} "
                                  f"outside [{low:g}, {high:g}] at {iv.start:.0f}")

    def _record_failure(self, i: int, source: GridSource, exc: SourceError, now: float) -> None:
        reason = exc.reason if exc.reason in ERROR_REASONS else "malformed"
        message = redact(str(exc), source.secrets())
        missing_secret = isinstance(exc, MissingSecret)
        with self._lock:
            self._errors[i][reason] = self._errors[i].get(reason, 0) + 1
            self._failures[i] += 1
            if self._down_since[i] is None:
                self._down_since[i] = now
            base = min(MAX_BACKOFF_SECONDS, MIN_BACKOFF_SECONDS * 2 ** (self._failures[i] - 1),
                       self.poll_interval(source))
            # Equal jitter: half the backoff is kept, the other half drawn at random. The kept half still
            # backs off; the random half keeps a fleet from polling in step.
            delay = base / 2 + self._rng.uniform(0.0, base / 2)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            self._next_poll[i] = now + delay
            already_warned = missing_secret and self._secret_warned[i]
            self._secret_warned[i] = missing_secret
            prev = self.state.statuses[i]
            status = SourceStatus(source.name, False, dict(self._errors[i]), prev.last_success, message)
            self._publish(i, status, None)
        fields = kv(source=source.name, signal=self.signal, reason=reason, err=message,
                    retry_in_seconds=round(delay, 1))
        if already_warned:
            # Said once already; the source stays down (counted as 'auth') until a key is provided.
            log.debug("source fetch failed", extra=fields)
        elif missing_secret:
            log.warning("source has no API key; it stays down until one is provided", extra=kv(
                source=source.name, signal=self.signal, reason=reason, err=message))
        else:
            log.warning("source fetch failed", extra=fields)

    def _publish(self, i: int, status: SourceStatus, cache: SourceCache | None, *,
                 replace_cache: bool = False) -> None:
        """Swap in a new state with source `i` changed. Callers hold self._lock."""
        caches = list(self.state.caches)
        if cache is not None or replace_cache:
            caches[i] = cache
        statuses = list(self.state.statuses)
        statuses[i] = status
        self.state = ChainState(self.signal, self.zone, self.max_age, self.state.sources,
                                tuple(caches), tuple(statuses))

    # --- carrying state over a reload ----------------------------------------------------------------

    def identity(self, i: int) -> tuple[str, str, str, str]:
        """What must be unchanged for source `i` to keep its state: signal, zone, type and config."""
        return (self.signal, self.zone, self.sources[i].name, self._digests[i])

    def runtime(self, i: int) -> SourceRuntime:
        """Source `i` as it stands, consistently (its poller may be running)."""
        with self._lock:
            return SourceRuntime(self.state.caches[i], self.state.statuses[i], self._failures[i],
                                 self._next_poll[i], self._down_since[i], self._secret_warned[i])

    def adopt(self, i: int, rt: SourceRuntime) -> None:
        """Take over what another chain knew about the same source: its cache, counters, health and
        schedule, so a reload neither forgets data nor refetches early. A shorter max_age may only bring
        the next poll forward; a backoff or Retry-After wait in progress stands."""
        source = self.sources[i]
        next_poll = rt.next_poll
        if rt.failures == 0 and rt.cache is not None:
            next_poll = min(next_poll, rt.cache.fetched_at + self.poll_interval(source))
        with self._lock:
            self._errors[i] = dict(rt.status.errors)
            self._failures[i] = rt.failures
            self._next_poll[i] = next_poll
            self._down_since[i] = rt.down_since
            self._secret_warned[i] = rt.secret_warned
            self._publish(i, replace(rt.status, name=source.name, errors=dict(rt.status.errors)), rt.cache,
                          replace_cache=True)

    def adopt_from(self, previous: SignalChain) -> list[int]:
        """Adopt the state of every source of `previous` whose identity is unchanged (same position
        preferred, else the first unused match: a source moved in the chain keeps its state too).
        Call before start(). Returns the indexes of the sources that carried over."""
        prev_ids = [previous.identity(j) for j in range(len(previous.sources))]
        used: set[int] = set()
        adopted: list[int] = []
        for i in range(len(self.sources)):
            ident = self.identity(i)
            matches = [j for j, other in enumerate(prev_ids) if other == ident and j not in used]
            if not matches:
                continue
            j = i if i in matches else matches[0]
            used.add(j)
            self.adopt(i, previous.runtime(j))
            adopted.append(i)
        return adopted

    # --- saving and restoring state across restarts --------------------------------------------------

    def state_key(self, i: int) -> str:
        return saved.source_key(self.signal, self.zone, i, self.sources[i].name, self._digests[i])

    def export_source(self, i: int) -> dict[str, Any]:
        rt = self.runtime(i)
        c = rt.cache
        return saved.dump_source(rt.status.up, rt.status.errors, rt.status.last_success,
                                 c.intervals if c is not None else None, c.currency if c is not None else None,
                                 c.fetched_at if c is not None else None)

    def restore_source(self, i: int, entry: saved.SavedSource, now: float) -> None:
        """Install a saved entry: its cache unless this chain holds newer data, its counters added to
        what this chain counted. A fresh restored cache is refetched one poll interval after it was
        fetched, as if the daemon had never stopped; a stale one at once."""
        source = self.sources[i]
        with self._lock:
            current_cache, current = self.state.caches[i], self.state.statuses[i]
            cache = current_cache
            if entry.intervals is not None and entry.fetched_at is not None and (
                    current_cache is None or entry.fetched_at > current_cache.fetched_at):
                cache = SourceCache(entry.intervals, tuple(iv.start for iv in entry.intervals), entry.currency,
                                    entry.fetched_at)
            for reason, n in entry.errors.items():
                self._errors[i][reason] = self._errors[i].get(reason, 0) + n
            last = max((t for t in (current.last_success, entry.last_success) if t is not None), default=None)
            untried = current.up is None and self._failures[i] == 0
            up = entry.up if untried else current.up
            if untried and cache is not None and now - cache.fetched_at <= self.max_age:
                self._next_poll[i] = max(self._next_poll[i], cache.fetched_at + self.poll_interval(source))
            status = SourceStatus(source.name, up, dict(self._errors[i]), last, current.last_error)
            self._publish(i, status, cache, replace_cache=True)

    # --- threads ---------------------------------------------------------------------------------

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
        so shutdown does not wait for them. Nothing here is shared with a chain that adopted this one's
        state, so stopping it never touches that chain."""
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
    # The chain's source that relayed `source` (a grid hub: "wattson"); "" when `source` is in the chain.
    via: str = ""


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
    """The configured chains plus the PUE. A chain that is None is disabled (`grid.price: null`): nothing is
    exported for that signal and no energy is unpriced for it. That differs from a configured chain with no
    data, whose energy is counted as unpriced."""

    pue: float = 1.0
    carbon: SignalChain | None = None
    price: SignalChain | None = None
    chains: list[SignalChain] = field(default_factory=list)
    forecast_windows: tuple[float, ...] = field(default_factory=lambda: parse_windows(DEFAULT_WINDOWS))
    _forecasts: ForecastCache = field(default_factory=ForecastCache, init=False, repr=False, compare=False)

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
                source=v.origin if v else None, estimated=bool(v and (v.interval.estimated or v.interval.forecast)),
                age_seconds=(t - v.fetched_at) if v else None,
                source_index=v.source_index if v else None,
                via=v.source if v is not None and v.interval.origin else "",
            ))
            for st in state.statuses:
                snap = SourceSnapshot(state.signal, st.name, st.up, tuple(sorted(st.errors.items())), st.last_success)
                key = (state.signal, st.name)
                sources[key] = _merge(sources[key], snap) if key in sources else snap
        return tuple(signals), tuple(sources[k] for k in sorted(sources))

    def best_windows(self, now: float) -> tuple[SignalForecast, ...]:
        """Each signal's best window per configured length, from the source serving it now. Called by the
        sampler every round, so it answers from a cache until a chain publishes new data or a minute passes."""
        out = []
        for chain in self.chains:
            found = self._forecasts.get(chain.state, now, self.forecast_windows)
            if found is not None:
                out.append(found)
        return tuple(out)

    def chain(self, signal: str) -> SignalChain | None:
        return self.carbon if signal == "carbon" else self.price if signal == "price" else None

    def is_disabled(self, signal: str) -> bool:
        """True when the signal is switched off (None): its energy is neither priced nor unpriced."""
        return self.chain(signal) is None

    def describe(self) -> str:
        """One line for the log: each signal's zone and fallback chain, e.g.
        'carbon=DE:electricitymaps>bundled price=DE:entsoe>static'."""
        parts = []
        for signal in SIGNALS:
            chain = self.chain(signal)
            parts.append(f"{signal}=disabled" if chain is None
                         else f"{signal}={chain.zone}:{'>'.join(s.name for s in chain.sources)}")
        return " ".join(parts)

    def export_state(self) -> dict[str, Any]:
        """Each source's cache and counters as JSON-ready data, for `restore_state` after a restart. Keys
        name signal, zone, position, type and a hash of the source's config."""
        sources = {chain.state_key(i): chain.export_source(i)
                   for chain in self.chains for i in range(len(chain.sources))}
        return {"version": saved.STATE_VERSION, "sources": sources}

    def restore_state(self, data: Any, now: float | None = None) -> list[str]:
        """Install what `export_state` saved for each source whose key still matches (a source whose
        config, position, zone or signal changed does not match; its entry is ignored). Every field is
        checked; a bad entry is skipped and described in the returned one-line problems. Never raises.
        Call before start(). Restored caches obey max_age like fetched ones."""
        if now is None:
            now = self.chains[0].clock() if self.chains else time.time()
        try:
            return self._restore(data, now)
        except Exception as exc:  # never let a broken file stop the daemon; say what happened
            return [f"grid state: not restored: unexpected {type(exc).__name__}"]

    def _restore(self, data: Any, now: float) -> list[str]:
        if not isinstance(data, dict):
            return ["grid state: not a mapping; nothing restored"]
        if not data:
            return []  # nothing was saved (a state file from before the grid had any): not a problem
        version = data.get("version")
        if type(version) is not int or version != saved.STATE_VERSION:  # `true == 1` in Python
            return [f"grid state: version {str(version)[:20]} is not {saved.STATE_VERSION}; nothing restored"]
        entries = data.get("sources")
        if not isinstance(entries, dict):
            return ["grid state: 'sources' is not a mapping; nothing restored"]
        problems: list[str] = []
        for chain in self.chains:
            for i in range(len(chain.sources)):
                key = chain.state_key(i)
                if key not in entries:
                    continue
                try:
                    entry = saved.parse_source(entries[key], chain.signal, now, partial(chain.price_limit, i))
                except ValueError as exc:
                    problems.append(f"grid state: {key}: {exc}; entry skipped")
                    continue
                chain.restore_source(i, entry, now)
        return problems

    def start(self) -> None:
        for c in self.chains:
            c.start()

    def stop(self) -> None:
        for c in self.chains:
            c.stop()
