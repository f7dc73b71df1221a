"""Period-aligned totals: energy, net cost and CO2e since the start of the day and of the month.

Prometheus cannot say "since midnight" cheaply (a month-to-date sum reads a month of samples per series),
so wattson keeps these totals itself, from the same steps its counters count:

* Each energy step is split at every period boundary it spans (midnight and the first of the month, in
  UTC and in the configured fixed offset), the energy in proportion to time exactly as accounting splits a
  step at price changes, and each piece is priced on its own. A piece lies within one day and one month of
  every offset, so it is added whole to the periods it belongs to: the totals are exactly what the
  counters were given since the period start, whatever the sampling interval and across restarts.
* Amounts are kept as exact fixed-point integers (units of 2**-1074, like attribution.ExactSum), so they
  never drift from the sum of the pieces, however long a month.
* Cost is net: signed amounts per currency (credits at negative prices subtract).

Cost per step is a comparison: the calendar caches the span between the last and next boundary of any
period, and a step inside it is neither split nor classified again. Every period changes at the same
instants, so the ledger keeps one running sum since the last boundary ("segment") per key, and per period
only the sums of its closed segments; a step adds to one sum, not to one per period. The host's pieces are
only noted while the GPUs are read, and summed in one loop after the round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from .energy import EnergyStep
from .workloads.attribution import integer_weights

if TYPE_CHECKING:
    from .accounting import StepCharge

log = logging.getLogger("wattson.periods")

PERIODS = ("day", "month")
UTC = "+00:00"
DAY_SECONDS = 86_400
OFFSET_RANGE = (-12 * 3600, 14 * 3600)  # UTC-12:00 .. UTC+14:00: the offsets in use
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_SHIFT = 1074  # every finite double is an integer number of 2**-1074
_SHIFT1 = _SHIFT + 1  # x = n / d with d = 2**(d.bit_length() - 1): n << (_SHIFT1 - d.bit_length()) units
_ONE = 1 << _SHIFT  # units / _ONE is the nearest float (int / int rounds correctly)

Key = tuple[str, ...]  # () for the host, (scope, value) for a scope value
PeriodKey = tuple[str, str]  # (period, offset label)


def parse_offset(text: str) -> int:
    """Seconds east of UTC of a fixed offset written ±HH:MM ("+02:00" -> 7200), -12:00 to +14:00; else ValueError."""
    m = _OFFSET.match(text)
    if m is None:
        raise ValueError("expected a fixed UTC offset written ±HH:MM, like +02:00 or -05:30")
    hours, minutes = int(m.group(2)), int(m.group(3))
    if minutes >= 60:
        raise ValueError("minutes must be below 60")
    seconds = (hours * 3600 + minutes * 60) * (-1 if m.group(1) == "-" else 1)
    if not OFFSET_RANGE[0] <= seconds <= OFFSET_RANGE[1]:
        raise ValueError("outside -12:00 to +14:00, the offsets in use")
    return seconds


def format_offset(seconds: int) -> str:
    """7200 -> "+02:00"; 0 -> "+00:00" (the `offset` label)."""
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    return f"{sign}{hours:02d}:{rest // 60:02d}"


def period_offsets(configured: str | None) -> tuple[int, ...]:
    """UTC always, and the configured offset too when it is another one."""
    if configured is None:
        return (0,)
    seconds = parse_offset(configured)
    return (0,) if seconds == 0 else (0, seconds)


def period_bounds(period: str, offset: int, t: float) -> tuple[int, int]:
    """[start, end) as UNIX seconds of the day or month that contains `t`, at a fixed UTC offset (seconds).
    Integer arithmetic on floor(t): boundaries are whole seconds, so floor(t) and t are in the same period."""
    local = math.floor(t) + offset
    if period == "day":
        start = local - local % DAY_SECONDS
        return start - offset, start + DAY_SECONDS - offset
    day = datetime.fromtimestamp(local - local % DAY_SECONDS, tz=timezone.utc)
    first = datetime(day.year, day.month, 1, tzinfo=timezone.utc)
    following = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int(first.timestamp()) - offset, int(following.timestamp()) - offset


def step_time(start: float, end: float) -> float:
    """The instant that places a piece of a step in its periods: its start (a piece ending at midnight
    belongs to the day before). A step whose wall clock went backwards is placed at its end."""
    return start if start < end else end


class PeriodCalendar:
    """The periods (day and month per offset) and the segment between the last and next boundary of any
    of them, cached for the latest instant asked about. Not thread-safe: each user owns one."""

    def __init__(self, offsets: Sequence[int] = (0,)) -> None:
        self.offsets = tuple(dict.fromkeys(offsets))
        self.keys: tuple[PeriodKey, ...] = tuple((p, format_offset(o)) for o in self.offsets for p in PERIODS)
        self._spec = tuple((p, o) for o in self.offsets for p in PERIODS)
        self.seg_start = math.inf  # the cached segment [seg_start, seg_end); empty until first asked
        self.seg_end = -math.inf
        self._bounds: tuple[tuple[int, int], ...] = ()

    def bounds(self, t: float) -> tuple[tuple[int, int], ...]:
        """[start, end) of every period (in `keys` order) that contains `t`."""
        if self.seg_start <= t < self.seg_end:
            return self._bounds
        bounds = tuple(period_bounds(p, o, t) for p, o in self._spec)
        self._bounds = bounds
        self.seg_start = max(b[0] for b in bounds)
        self.seg_end = min(b[1] for b in bounds)
        return bounds

    def boundaries(self, t0: float, t1: float) -> list[int]:
        """Every period start strictly between t0 and t1, in order (month starts are day starts)."""
        found: set[int] = set()
        for offset in self.offsets:
            b = period_bounds("day", offset, t0)[1]
            while b < t1:
                found.add(b)
                b += DAY_SECONDS
        return sorted(found)

    def pieces(self, step: EnergyStep) -> Sequence[EnergyStep]:
        """The step itself when it lies within one segment (two comparisons); else its pieces between the
        boundaries it spans, the energy split exactly in proportion to time."""
        if self.seg_start <= step.start and step.end <= self.seg_end:
            return (step,)
        if step.end <= step.start:
            return (step,)  # the wall clock went backwards: no span to split, placed at its end
        self.bounds(step.end)  # move the cache on: the next steps start near here
        cuts = self.boundaries(step.start, step.end)
        if not cuts:
            return (step,)
        edges = [Fraction(step.start), *map(Fraction, cuts), Fraction(step.end)]
        energy = split_in_proportion(step.joules, [b - a for a, b in zip(edges, edges[1:], strict=False)])
        times = [step.start, *map(float, cuts), step.end]
        return tuple(dataclasses.replace(step, start=a, end=b, joules=j)
                     for a, b, j in zip(times, times[1:], energy, strict=False))


def split_in_proportion(total: float, weights: Sequence[Fraction]) -> list[float]:
    """`total` split in proportion to `weights` (> 0): the parts add up to exactly `total`, and each is within
    one unit in the last place of the largest part of its exact share.

    (attribution.split_exact splits in units of the total's last binary digit, which for a round total such
    as 1000.0 J is 8 J: fine for shares of a step between processes, too coarse for a time proportion.) Here
    the unit is the ulp of the largest share, so every part fits a double and the total is a whole number
    of units; those are apportioned by largest remainder."""
    if total == 0.0 or not math.isfinite(total):
        return [total * float(w / sum(weights)) for w in weights]
    ints = integer_weights(weights)
    weight_sum = sum(ints)
    magnitude = abs(total)
    largest = Fraction(magnitude) * max(ints) / weight_sum
    exponent = max(min(math.frexp(float(largest))[1], math.frexp(magnitude)[1]) - 53, -1074)
    units = int(Fraction(magnitude) / Fraction(2) ** exponent)  # exact: |total| is a multiple of the unit
    quotients = [divmod(units * w, weight_sum) for w in ints]
    parts = [q for q, _ in quotients]
    for i in sorted(range(len(ints)), key=lambda k: (-quotients[k][1], k))[:units - sum(parts)]:
        parts[i] += 1
    sign = -1.0 if total < 0 else 1.0
    return [sign * math.ldexp(float(p), exponent) if p else 0.0 for p in parts]


def _units(x: float) -> int:
    """x as an exact integer of 2**-1074 units; ValueError/OverflowError for nan/inf."""
    n, d = x.as_integer_ratio()
    return n << (_SHIFT1 - d.bit_length())


class _Elsewhere(Exception):
    """A piece outside the open segment: add_all goes one by one."""


class _Sums:
    """Exact energy, signed cost per currency and CO2e, in units."""

    __slots__ = ("energy", "cost", "grams")

    def __init__(self) -> None:
        self.energy = 0
        self.cost: dict[str, int] = {}
        self.grams = 0

    def add(self, other: _Sums) -> None:
        self.energy += other.energy
        self.grams += other.grams
        for c, u in other.cost.items():
            self.cost[c] = self.cost.get(c, 0) + u

    def add_units(self, energy: int, cost: Sequence[tuple[str, int]], grams: int) -> None:
        self.energy += energy
        self.grams += grams
        for c, u in cost:
            self.cost[c] = self.cost.get(c, 0) + u


@dataclass(frozen=True)
class PeriodTotals:
    """One period's totals as published (immutable; rendered at scrape time without computation)."""

    period: str  # day | month
    offset: str  # "+00:00", or the configured offset
    start: float  # UNIX time the period started
    energy_joules: float  # GPU energy, no PUE
    cost: tuple[tuple[str, float], ...]  # currency -> net amount (cost minus credit)
    co2e_grams: float


@dataclass(frozen=True)
class ScopePeriodTotals:
    """The totals of one budget scope value (e.g. namespace "ml-research") in one period."""

    scope: str  # namespace | account | user
    value: str
    totals: PeriodTotals


class PeriodLedger:
    """Exact period totals per key (one key for a host, one per scope value for workloads).

    Totals of period i = closed segments of period i (`_base[i]`) + the open segment. A piece is added at
    its instant t (step_time): inside the open segment, to it; after it, the periods that ended start
    afresh and the others keep the segment; before it (another GPU's piece from just before a boundary, or
    a gap step after a restart), straight to the periods that still contain t. Pieces of a period already
    over are not kept: only current periods are exported."""

    def __init__(self, calendar: PeriodCalendar) -> None:
        self.calendar = calendar
        self.keys = calendar.keys
        self._starts: tuple[int, ...] | None = None  # the periods the totals are for; None before the first piece
        self._ends: tuple[int, ...] = ()
        self._seg_start = math.inf
        self._seg_end = -math.inf
        self._segment: dict[Key, _Sums] = {}
        self._base: list[dict[Key, _Sums]] = [{} for _ in self.keys]
        self._currencies: dict[str, None] = {}  # every currency seen: shown at 0 in a new period (host view)
        self._dirty: set[Key] = set()  # keys changed since the last view
        self._moved = True  # periods changed since the last view: every key is dirty

    def add(self, t: float, keys: Sequence[Key], energy: float, cost: Sequence[tuple[str, float]],
            grams: float) -> None:
        """Add one piece (GPU energy, signed cost per currency, grams) to `keys` at instant t. ValueError or
        OverflowError, and nothing added, for a non-finite amount."""
        e, g = _units(energy), _units(grams)
        c = [(currency, _units(amount)) for currency, amount in cost]
        if not self._seg_start <= t < self._seg_end:
            if self._starts is None or t >= self._seg_end:
                self._move(t)
            else:
                self._add_late(t, keys, e, c, g)
                return
        self._add_units(keys, e, c, g)

    def add_all(self, key: Key, pieces: Sequence[tuple[float, float, Sequence[tuple[str, float]], float]]) -> int:
        """add() of many pieces (t, energy, cost, grams) to one key. When all lie in the open segment (a round's
        steps, nearly always) they are summed in local integers and added once. Returns how many pieces had a
        non-finite amount (left out)."""
        lo, hi = self._seg_start, self._seg_end
        e_sum = g_sum = 0
        c_sum: dict[str, int] = {}
        try:
            for t, energy, cost, grams in pieces:
                if not lo <= t < hi:
                    raise _Elsewhere
                n, d = energy.as_integer_ratio()
                e_sum += n << (_SHIFT1 - d.bit_length())
                n, d = grams.as_integer_ratio()
                g_sum += n << (_SHIFT1 - d.bit_length())
                for currency, amount in cost:
                    n, d = amount.as_integer_ratio()
                    c_sum[currency] = c_sum.get(currency, 0) + (n << (_SHIFT1 - d.bit_length()))
        except (_Elsewhere, ValueError, OverflowError):  # nothing added yet: one by one instead
            bad = 0
            for t, energy, cost, grams in pieces:
                try:
                    self.add(t, (key,), energy, cost, grams)
                except (ValueError, OverflowError):
                    bad += 1
            return bad
        self._add_units((key,), e_sum, list(c_sum.items()), g_sum)
        return 0

    def _add_units(self, keys: Sequence[Key], e: int, c: list[tuple[str, int]], g: int) -> None:
        """Add converted amounts to the open segment."""
        if not (e or g or c):
            return
        segment = self._segment
        for key in keys:
            sums = segment.get(key)
            if sums is None:
                sums = segment[key] = _Sums()
            sums.energy += e
            sums.grams += g
            sc = sums.cost
            for currency, u in c:
                if currency in sc:
                    sc[currency] += u
                else:
                    sc[currency] = u
                    self._currencies[currency] = None
        self._dirty.update(keys)

    def _add_late(self, t: float, keys: Sequence[Key], e: int, c: list[tuple[str, int]], g: int) -> None:
        assert self._starts is not None
        for i, start in enumerate(self._starts):
            if t >= start:  # and t < end: t is before the open segment, which ends no later than any period
                base = self._base[i]
                for key in keys:
                    sums = base.get(key)
                    if sums is None:
                        sums = base[key] = _Sums()
                    sums.add_units(e, c, g)
        for key in keys:
            self._dirty.add(key)
        for currency, _ in c:
            self._currencies.setdefault(currency, None)

    def _move(self, t: float) -> None:
        """Open the segment containing t (after the current one): fold the open segment into the periods
        that go on, start the ones that ended afresh."""
        bounds = self.calendar.bounds(t)
        starts = tuple(b[0] for b in bounds)
        if self._starts is not None:
            for i, start in enumerate(starts):
                if start == self._starts[i]:
                    base = self._base[i]
                    for key, sums in self._segment.items():
                        mine = base.get(key)
                        if mine is None:
                            mine = base[key] = _Sums()
                        mine.add(sums)
                else:
                    self._base[i] = {}
        self._segment = {}
        self._starts, self._ends = starts, tuple(b[1] for b in bounds)
        self._seg_start, self._seg_end = max(starts), min(self._ends)
        self._moved = True

    def _totals(self, i: int, key: Key) -> _Sums | None:
        base, seg = self._base[i].get(key), self._segment.get(key)
        if base is None or seg is None:
            return base if seg is None else seg
        out = _Sums()
        out.add(base)
        out.add(seg)
        return out

    def _published(self, i: int, sums: _Sums | None, start: float, currencies: Collection[str],
                   more: _Sums | None = None) -> PeriodTotals:
        """Period i's totals as floats: `sums` (+ `more`), every currency of `currencies` at least at 0."""
        period, offset = self.keys[i]
        if sums is None:
            sums, more = more, None
        if sums is None:
            return PeriodTotals(period, offset, float(start), 0.0, tuple((c, 0.0) for c in sorted(currencies)),
                                0.0)
        energy, grams, cost = sums.energy, sums.grams, sums.cost
        if more is not None:
            energy += more.energy
            grams += more.grams
            cost = cost | {c: cost.get(c, 0) + u for c, u in more.cost.items()}
        if len(cost) < len(currencies):  # a currency seen before but not in this period: shown at 0
            cost = dict.fromkeys(currencies, 0) | cost
        items = sorted(cost.items()) if len(cost) > 1 else cost.items()
        return PeriodTotals(period, offset, float(start), energy / _ONE, tuple([(c, u / _ONE) for c, u in items]),
                            grams / _ONE)

    # -- host view: one key, every period always there ----------------------------------------------------

    def host_view(self, now: float, key: Key = ()) -> tuple[PeriodTotals, ...]:
        """Every period at `now`: a period over by `now` (no piece has come in the new one yet) shows 0
        from the new period's start, so "today" goes to 0 at midnight even while no GPU reports."""
        out = []
        current = None
        seg = self._segment.get(key)
        for i in range(len(self.keys)):
            if self._starts is not None and now < self._ends[i]:
                out.append(self._published(i, self._base[i].get(key), self._starts[i], self._currencies, seg))
            else:
                current = current or self.calendar.bounds(now)
                out.append(self._published(i, None, current[i][0], self._currencies))
        self._dirty.clear()
        self._moved = False
        return tuple(out)

    def changed(self) -> bool:
        return self._moved or bool(self._dirty)

    def valid_until(self) -> float:
        """A view stays right until a period of the ledger ends (or anything is added)."""
        return min(self._ends) if self._ends else -math.inf

    # -- scope view: many keys, a key shows only in the periods it was seen in ---------------------------

    def key_view(self, key: Key) -> tuple[PeriodTotals, ...]:
        """The periods `key` has totals in (ended periods included: filter them at `now`)."""
        if self._starts is None:
            return ()
        out = []
        for i in range(len(self.keys)):
            sums = self._totals(i, key)
            if sums is not None:
                out.append(self._published(i, sums, self._starts[i], ()))
        return tuple(out)

    def all_keys(self) -> set[Key]:
        keys = set(self._segment)
        for base in self._base:
            keys.update(base)
        return keys

    def take_dirty(self) -> tuple[bool, set[Key]]:
        """(periods moved, keys changed) since the last call; resets both."""
        moved, dirty = self._moved, self._dirty
        self._moved, self._dirty = False, set()
        return moved, dirty

    def ends(self) -> dict[PeriodKey, float]:
        """When each current period of the ledger ends (empty before the first piece)."""
        return dict(zip(self.keys, self._ends, strict=True)) if self._starts is not None else {}

    # -- durable state ------------------------------------------------------------------------------------

    def restore(self, key: Key, period: str, offset: str, start: float, energy: float,
                cost: dict[str, float], grams: float, now: float) -> bool:
        """Continue a saved period total when it is of the period containing `now`; False (not restored)
        when that period is over."""
        if self._starts is None:
            self._move(now)
        assert self._starts is not None
        try:
            i = self.keys.index((period, offset))
        except ValueError:
            return False  # an offset no longer configured
        if start != self._starts[i]:
            return False
        sums = _Sums()
        sums.add_units(_units(energy), [(c, _units(a)) for c, a in cost.items()], _units(grams))
        self._base[i][key] = sums
        self._dirty.add(key)
        for currency in cost:
            self._currencies.setdefault(currency, None)
        return True

    def exact(self, key: Key = ()) -> dict[PeriodKey, dict[str, Any]]:
        """Exact totals per period (Fractions), for tests."""
        out: dict[PeriodKey, dict[str, Any]] = {}
        for i, pk in enumerate(self.keys):
            sums = self._totals(i, key) if self._starts is not None else None
            if sums is None:
                sums = _Sums()
            out[pk] = {"start": self._starts[i] if self._starts is not None else None,
                       "energy_joules": Fraction(sums.energy, _ONE), "co2e_grams": Fraction(sums.grams, _ONE),
                       "cost": {c: Fraction(u, _ONE) for c, u in sums.cost.items()}}
        return out


def totals_to_json(t: PeriodTotals) -> dict[str, Any]:
    return {"period": t.period, "offset": t.offset, "start": t.start, "energy_joules": t.energy_joules,
            "cost": dict(t.cost), "co2e_grams": t.co2e_grams}


def finite_number(value: Any, where: str, signed: bool = False) -> float:
    """A number read back from the state file: finite, and not negative unless `signed`; ValueError naming
    `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: not a finite number")
    if value < 0 and not signed:
        raise ValueError(f"{where}: negative")
    return float(value)


def totals_from_json(d: Any) -> tuple[str, str, float, float, dict[str, float], float]:
    """(period, offset, start, energy, cost, grams) of a saved entry; ValueError when malformed."""
    if not isinstance(d, dict):
        raise ValueError("not an object")
    period, offset = d.get("period"), d.get("offset")
    if period not in PERIODS or not isinstance(offset, str):
        raise ValueError(f"period {period!r} / offset {offset!r}")
    cost = d.get("cost", {})
    if not isinstance(cost, dict):
        raise ValueError("cost: not an object")
    return (period, offset, finite_number(d.get("start"), "start"),
            finite_number(d.get("energy_joules"), "energy_joules"),
            {str(c): finite_number(a, f"cost.{c}", signed=True) for c, a in cost.items()},
            finite_number(d.get("co2e_grams", 0.0), "co2e_grams"))


class HostPeriods:
    """The host's period totals (sum over its GPUs), owned by the sampler.

    `pieces` and `add` run in the round's reader thread, `snapshot` after the round, one at a time (the
    sampler never runs two rounds at once), so there is no lock. `add` only notes the piece: the exact sums
    are made once per round, in `snapshot`, in one tight loop."""

    HOST: tuple[Key, ...] = ((),)

    def __init__(self, offsets: Sequence[int] = (0,)) -> None:
        self.offsets = tuple(dict.fromkeys(offsets))
        self.calendar = PeriodCalendar(self.offsets)
        self.ledger = PeriodLedger(PeriodCalendar(self.offsets))  # its own cache: moved by pieces, not steps
        self._view: tuple[PeriodTotals, ...] = ()
        self._view_until = -math.inf
        self._pending: list[tuple[float, float, Sequence[tuple[str, float]], float]] = []
        self._said_non_finite = False

    def pieces(self, step: EnergyStep) -> Sequence[EnergyStep]:
        return self.calendar.pieces(step)

    def add(self, piece: EnergyStep, charge: StepCharge) -> None:
        """Count one priced piece (within one segment: see pieces())."""
        start, end = piece.start, piece.end
        self._pending.append((start if start < end else end, piece.joules, charge.cost, charge.co2e_grams))

    def flush(self) -> None:
        """Sum the pieces noted since the last call into the ledger."""
        pending, self._pending = self._pending, []
        if pending and self.ledger.add_all((), pending) and not self._said_non_finite:
            self._said_non_finite = True  # the GPU's own totals have it; once is enough to say so
            log.warning("a non-finite amount was left out of the period totals")

    def snapshot(self, now: float) -> tuple[PeriodTotals, ...]:
        """The immutable view after a round; the previous one when nothing changed."""
        self.flush()
        if self.ledger.changed() or now >= self._view_until or not self._view:
            self._view = self.ledger.host_view(now)
            until = self.ledger.valid_until()
            self._view_until = until if now < until else self.ledger.calendar.seg_end
        return self._view

    def exact(self) -> dict[PeriodKey, dict[str, Any]]:
        """Exact totals per period (Fractions), for tests."""
        self.flush()
        return self.ledger.exact()

    def restore(self, entries: Iterable[Any], now: float) -> int:
        """Continue the saved totals of the periods still current at `now`; returns how many entries were
        malformed (skipped). Totals of a period that is over start at 0."""
        self.flush()
        bad = 0
        for entry in entries:
            try:
                period, offset, start, energy, cost, grams = totals_from_json(entry)
            except ValueError:
                bad += 1
                continue
            self.ledger.restore((), period, offset, start, energy, cost, grams, now)
        self._view_until = -math.inf
        return bad


def state_entries(totals: Iterable[PeriodTotals]) -> list[dict[str, Any]]:
    """The state file's `periods` list for a snapshot's period totals."""
    return [totals_to_json(t) for t in totals]


class ScopePeriods:
    """Period totals per budget scope value (namespace, account, user) of the workloads, owned by the
    workload tracker, which holds its lock around every call. A value shows in the periods it was charged
    in; a new period starts without it."""

    def __init__(self, offsets: Sequence[int] = (0,)) -> None:
        self.ledger = PeriodLedger(PeriodCalendar(offsets))
        self._cache: dict[Key, tuple[PeriodTotals, ...]] = {}
        self._view: tuple[ScopePeriodTotals, ...] = ()
        self._view_until = -math.inf

    def add(self, t: float, keys: Sequence[tuple[str, str]], energy: float, cost: Sequence[tuple[str, float]],
            grams: float) -> None:
        """One workload's share of a piece, added to each of its scope values ((scope, value) keys)."""
        if keys:
            self.ledger.add(t, keys, energy, cost, grams)

    def snapshot(self, now: float) -> tuple[ScopePeriodTotals, ...]:
        """The immutable view at `now`; only values charged since the last call are rebuilt."""
        moved, dirty = self.ledger.take_dirty()
        if not moved and not dirty and now < self._view_until:
            return self._view
        if moved:
            self._cache = {k: self.ledger.key_view(k) for k in self.ledger.all_keys()}
        else:
            for k in dirty:
                self._cache[k] = self.ledger.key_view(k)
        ends = self.ledger.ends()
        self._view = tuple(ScopePeriodTotals(k[0], k[1], t) for k in sorted(self._cache)
                           for t in self._cache[k] if now < ends[(t.period, t.offset)])
        later = [e for e in ends.values() if e > now]
        self._view_until = min(later) if later else math.inf
        return self._view

    def export(self) -> list[dict[str, Any]]:
        """Every value's current totals for the state file (a restart in a later period drops them)."""
        return [{"scope": k[0], "value": k[1], **totals_to_json(t)}
                for k in sorted(self.ledger.all_keys()) for t in self.ledger.key_view(k)]

    def restore(self, entries: Any, now: float) -> int:
        """Continue saved totals of periods still current at `now`; returns how many entries were malformed."""
        if not isinstance(entries, list):
            return 0 if entries is None else 1
        bad = 0
        for entry in entries:
            try:
                period, offset, start, energy, cost, grams = totals_from_json(entry)
                scope, value = entry["scope"], entry["value"]
                if not isinstance(scope, str) or not isinstance(value, str) or not scope or not value:
                    raise ValueError("scope/value")
            except (ValueError, KeyError):
                bad += 1
                continue
            self.ledger.restore((scope, value), period, offset, start, energy, cost, grams, now)
        self._view_until = -math.inf
        return bad


__all__ = ["HostPeriods", "PeriodCalendar", "PeriodLedger", "PeriodTotals", "ScopePeriodTotals", "ScopePeriods",
           "PERIODS", "UTC",
           "format_offset", "parse_offset", "period_bounds", "period_offsets", "state_entries", "step_time"]
