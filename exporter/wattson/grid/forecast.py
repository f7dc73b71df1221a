"""When is the cheapest, cleanest time to run a job: best windows from the data a source already holds.

A signal's best window of length L is the contiguous span [s, s + L] with the lowest time-weighted
average, searched in the intervals of the one source that serves the signal now (the chain's first fresh
source whose data covers this moment), never a mix of sources: one provider's forecast is internally
consistent, a splice of two is not. Windows start now or later and end by the end of that source's data;
a window that would cover time the source has no value for is not eligible. Nothing here fetches: it
reads the chain's immutable state.

The average over a sliding window of a piecewise-constant function is piecewise linear in the window's
start, so its minimum lies at a breakpoint: now, an interval start, or an interval end minus L. Only
those candidates are evaluated; ties go to the earliest.

`forecast_response` answers `GET /api/v1/forecast` in the shape of the Green Software Foundation Carbon
Aware SDK's `GET /emissions/forecasts/current`, so schedulers written for that API work unchanged.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for type hints: signal.py imports this module
    from .signal import ChainState, GridSignals, SourceCache, Value

DEFAULT_WINDOWS: tuple[str, ...] = ("1h", "3h", "8h")
MAX_WINDOW_SECONDS = 7 * 86400.0
# Windows are searched at most this far ahead: a static or bundled source's data never really ends.
SEARCH_LIMIT_SECONDS = 7 * 86400.0
# The sampler asks every round; a chain state it has seen is searched again at most this often.
REFRESH_SECONDS = 60.0
SIGNALS = ("carbon", "price")

_WINDOW = re.compile(r"([0-9]+)([mh])")


def parse_window(text: str) -> float:
    """'90m' or '3h' -> seconds. ValueError with a one-line message for anything else."""
    m = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"window {text!r}: expected a whole number of minutes or hours, like 90m or 3h")
    seconds = int(m.group(1)) * (60 if m.group(2) == "m" else 3600)
    if seconds <= 0:
        raise ValueError(f"window {text!r}: must be longer than 0")
    if seconds > MAX_WINDOW_SECONDS:
        raise ValueError(f"window {text!r}: longer than {MAX_WINDOW_SECONDS / 3600:.0f}h")
    return float(seconds)


def parse_windows(texts: Sequence[str]) -> tuple[float, ...]:
    """Each window in seconds, in the given order; ValueError on a bad or repeated one."""
    out: list[float] = []
    for text in texts:
        seconds = parse_window(text)
        if seconds in out:
            raise ValueError(f"window {text!r}: listed twice (as {window_label(seconds)})")
        out.append(seconds)
    return tuple(out)


def window_label(seconds: float) -> str:
    """The `window` label: '3h' for whole hours, else minutes ('90m')."""
    minutes = round(seconds / 60)
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


@dataclass(frozen=True)
class BestWindow:
    """The lowest-average window of one length."""

    seconds: float
    start: float  # UNIX time
    value: float  # time-weighted average over [start, start + seconds], in exported units

    @property
    def label(self) -> str:
        return window_label(self.seconds)

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass(frozen=True)
class SignalForecast:
    """One signal's best windows as the sampler publishes them in each snapshot."""

    signal: str
    zone: str
    source: str  # the source whose data was searched: the one serving now
    currency: str | None
    now_value: float  # the value in force when computed
    horizon_end: float | None  # end of the source's data; None when it ends within the current interval
    windows: tuple[BestWindow, ...]  # the configured lengths that fit, in configured order
    computed_at: float
    fetched_at: float  # when the searched data was fetched

    def horizon_seconds(self, now: float) -> float | None:
        """How far ahead the serving source's data reach from `now`; None when not beyond the current interval."""
        if self.horizon_end is None or self.horizon_end <= now:
            return None
        return self.horizon_end - now


class Series:
    """One source's data between `lo` and `hi` as a piecewise-constant function with gaps, and its
    running integral, so the average over any window costs two bisections."""

    def __init__(self, cache: SourceCache, lo: float, hi: float) -> None:
        cuts = {lo, hi}
        for iv in cache.intervals:
            if iv.end > lo and iv.start < hi:
                cuts.add(max(iv.start, lo))
                cuts.add(min(iv.end, hi))
        self.points: list[float] = sorted(cuts)
        # The value on [points[k], points[k+1]), as the source answers lookups (None: no data there).
        self.values: list[float | None] = []
        for a in self.points[:-1]:
            held = cache.at(a)
            self.values.append(held.value if held is not None else None)
        self.integral = [0.0]  # integral from lo to points[k]
        self.gaps = [0]  # segments without data before points[k]
        for k, v in enumerate(self.values):
            width = self.points[k + 1] - self.points[k]
            self.integral.append(self.integral[-1] + (v * width if v is not None else 0.0))
            self.gaps.append(self.gaps[-1] + (v is None))

    @property
    def lo(self) -> float:
        return self.points[0]

    @property
    def hi(self) -> float:
        return self.points[-1]

    def _integral_at(self, t: float, k: int) -> float:
        v = self.values[k] if k < len(self.values) else None
        return self.integral[k] + (v * (t - self.points[k]) if v is not None else 0.0)

    def average(self, start: float, end: float) -> float | None:
        """The time-weighted average over [start, end], or None when any part of it has no data."""
        if start < self.lo or end > self.hi or end <= start:
            return None
        k0 = bisect.bisect_right(self.points, start) - 1  # segment holding start
        k1 = bisect.bisect_left(self.points, end) - 1  # segment holding end (from the left)
        if self.gaps[k1 + 1] - self.gaps[k0] != 0:
            return None
        return (self._integral_at(end, k1) - self._integral_at(start, k0)) / (end - start)

    def windows(self, seconds: float) -> list[tuple[float, float]]:
        """(start, average) of every eligible window of this length starting at a candidate, by start."""
        starts = {self.lo}
        starts.update(p for p in self.points if p + seconds <= self.hi)
        starts.update(p - seconds for p in self.points if p - seconds >= self.lo)
        out = []
        for s in sorted(starts):
            avg = self.average(s, s + seconds)
            if avg is not None:
                out.append((s, avg))
        return out


def lowest(windows: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The window with the lowest average; the earliest of equals (sums of floats differ in the last bits)."""
    best: tuple[float, float] | None = None
    for s, avg in windows:
        if best is None or avg < best[1] - 1e-9 * max(1.0, abs(best[1])):
            best = (s, avg)
    return best


def serving(state: ChainState, now: float) -> tuple[Value, SourceCache] | None:
    """The value in force now and the cache of the source it comes from; None when none serves."""
    v = state.value_at(now, now)
    if v is None:
        return None
    cache = state.caches[v.source_index]
    return (v, cache) if cache is not None else None


def data_end(cache: SourceCache) -> float:
    return max(iv.end for iv in cache.intervals)


def forecast_signal(state: ChainState, now: float, windows: Sequence[float]) -> SignalForecast | None:
    """Best windows of each length for one chain, or None when no source serves the signal now."""
    found = serving(state, now)
    if found is None:
        return None
    value, cache = found
    end = data_end(cache)
    series = Series(cache, now, min(end, now + SEARCH_LIMIT_SECONDS))
    best: list[BestWindow] = []
    for seconds in windows:
        pick = lowest(series.windows(seconds))
        if pick is not None:
            best.append(BestWindow(seconds, pick[0], pick[1]))
    return SignalForecast(
        signal=state.signal, zone=state.zone, source=value.source, currency=value.currency, now_value=value.value,
        horizon_end=end if end > value.interval.end else None, windows=tuple(best), computed_at=now,
        fetched_at=cache.fetched_at)


class ForecastCache:
    """Per signal, the last result and what it was computed from. The sampler asks every round (up to
    10 Hz): a chain state already searched, with the same windows, is answered from here for
    REFRESH_SECONDS; a new state (any fetch) or a new window list is searched at once."""

    def __init__(self, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.refresh_seconds = refresh_seconds
        self._entries: dict[str, tuple[ChainState, Sequence[float], float, SignalForecast | None]] = {}

    def get(self, state: ChainState, now: float, windows: Sequence[float]) -> SignalForecast | None:
        entry = self._entries.get(state.signal)
        if entry is not None and entry[0] is state and entry[1] == windows \
                and 0.0 <= now - entry[2] < self.refresh_seconds:
            return entry[3]
        result = forecast_signal(state, now, windows)
        self._entries[state.signal] = (state, windows, now, result)  # one assignment: readers see old or new
        return result


# --- GET /api/v1/forecast ---------------------------------------------------------------------------------


def iso(t: float) -> str:
    """UNIX seconds -> ISO 8601 UTC with a Z, to the second."""
    return datetime.fromtimestamp(math.floor(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(name: str, text: str) -> float:
    """An ISO 8601 time -> UNIX seconds; a time without an offset is UTC."""
    raw = text.strip()
    if raw[-1:] in ("Z", "z"):
        raw = raw[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an ISO 8601 time like 2025-01-15T12:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _error(status: int, message: str) -> tuple[int, dict[str, str]]:
    return status, {"error": message}


def _requested_window(query: Mapping[str, Sequence[str]], default: float) -> float:
    """`window=3h` (wattson's form) or `windowSize=180` (minutes, the SDK's form); ValueError when bad."""
    window = _one(query, "window")
    if window is not None:
        return parse_window(window)
    size = _one(query, "windowSize")
    if size is None:
        return default
    if not size.strip().isdigit() or int(size) <= 0:
        raise ValueError(f"windowSize {size!r}: expected a whole number of minutes above 0")
    seconds = int(size) * 60.0
    if seconds > MAX_WINDOW_SECONDS:
        raise ValueError(f"windowSize {size!r}: longer than {MAX_WINDOW_SECONDS / 60:.0f} minutes")
    return seconds


def forecast_response(grid: GridSignals, now: float, query: Mapping[str, Sequence[str]]) -> tuple[int, Any]:
    """The body of `GET /api/v1/forecast` as (HTTP status, JSON-ready object).

    `query` is the parsed query string (as urllib.parse.parse_qs returns it). Parameters: `signal`
    (carbon, the default, or price), `window` (90m, 3h) or the SDK's `windowSize` (minutes; default: the
    length of the interval in force now, or 60 when that is over a day), and the SDK's `dataStartAt` and
    `dataEndAt` (ISO 8601): windows lie within them. `location` is accepted and ignored: wattson answers
    for its one configured zone, which the answer's `location` names.

    200: a JSON array with one object (the SDK's EmissionsForecastDTO): `location`, `dataStartAt`,
    `dataEndAt`, `windowSize` (minutes), `optimalDataPoints` (the lowest window, earliest of equals),
    `forecastData` (the average of every eligible window by start), `generatedAt` (when the searched data
    were fetched), `requestedAt`; each point is {location, timestamp, duration (minutes), value}. A price
    answer's values are prices per kWh, retail adjustments included, and it adds `currency`.
    400 for a bad parameter, 404 for a disabled signal or no forecast, each as {"error": one line}.
    """
    signal = _one(query, "signal") or "carbon"
    if signal not in SIGNALS:
        return _error(400, f"signal must be carbon or price, got {signal[:40]!r}")
    chain = grid.chain(signal)
    if chain is None:
        return _error(404, f"the {signal} signal is disabled (grid.{signal}: null)")
    state = chain.state
    found = serving(state, now)
    default = 3600.0
    if found is not None and found[0].interval.end - found[0].interval.start <= 86400:
        default = max(60.0, round((found[0].interval.end - found[0].interval.start) / 60) * 60.0)
    try:
        seconds = _requested_window(query, default)
        start_text, end_text = _one(query, "dataStartAt"), _one(query, "dataEndAt")
        start = parse_time("dataStartAt", start_text) if start_text else None
        end = parse_time("dataEndAt", end_text) if end_text else None
    except ValueError as exc:
        return _error(400, str(exc))
    if start is not None and end is not None and end <= start:
        return _error(400, "dataEndAt must be after dataStartAt")
    if found is None:
        return _error(404, f"no forecast: no source serves the {signal} signal now (every source down or stale)")
    value, cache = found
    # Whole seconds: every timestamp in the answer is then exactly a window's start.
    lo = float(math.ceil(max(now, start if start is not None else now)))
    hi = min(data_end(cache), now + SEARCH_LIMIT_SECONDS, end if end is not None else math.inf)
    label = window_label(seconds)
    if hi - lo < seconds:
        return _error(404, f"no forecast: the {value.source} data for the {signal} signal hold no {label} window "
                           f"between {iso(lo)} and {iso(max(lo, hi))}")
    windows = Series(cache, lo, hi).windows(seconds)
    best = lowest(windows)
    if best is None:
        return _error(404, f"no forecast: the {value.source} data for the {signal} signal hold no {label} window "
                           f"without a gap between {iso(lo)} and {iso(hi)}")
    zone = state.zone
    minutes = round(seconds / 60)

    def point(s: float, avg: float) -> dict[str, Any]:
        return {"location": zone, "timestamp": iso(s), "duration": minutes, "value": round(avg, 6)}

    body: dict[str, Any] = {
        "location": zone, "dataStartAt": iso(lo), "dataEndAt": iso(hi), "windowSize": minutes,
        "optimalDataPoints": [point(*best)], "forecastData": [point(s, avg) for s, avg in windows],
        "generatedAt": iso(cache.fetched_at), "requestedAt": iso(now),
    }
    if signal == "price":
        body["currency"] = value.currency
    return 200, [body]
