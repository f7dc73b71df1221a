"""Day and month totals: steps split exactly at midnight and the first of the month (UTC and a fixed offset),
exact over many steps, continued by a restart within the period and started afresh by one in a later period."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import Clock, ConstantGpu, ListBackend, ScriptedSource
from wattson.energy import EnergyStep
from wattson.exposition import Exposition
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import StaticSource
from wattson.periods import (
    HostPeriods,
    PeriodCalendar,
    format_offset,
    parse_offset,
    period_bounds,
    period_offsets,
)
from wattson.sampler import Sampler
from wattson.state import FILE_NAME, StateStore, parse_state
from wattson.workloads.snapshot import EMPTY_WORKLOADS

DAY = 86_400
UTC = "+00:00"
T0 = int(datetime(2026, 12, 25, tzinfo=timezone.utc).timestamp())  # a midnight, UTC
JAN_1_2027 = int(datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp())
DEC_1_2026 = int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp())


def ts(*args: int, offset_hours: float = 0) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp() - offset_hours * 3600)  # type: ignore[misc]


# -- period arithmetic ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("+00:00", 0), ("-00:00", 0), ("+02:00", 7200), ("-05:30", -19800),
                                           ("+05:45", 20700), ("+14:00", 50400), ("-12:00", -43200)])
def test_offsets_parse_and_print(text, seconds):
    assert parse_offset(text) == seconds
    assert format_offset(seconds) == ("+00:00" if seconds == 0 else text)


@pytest.mark.parametrize("text", ["+2", "02:00", "+02:60", "+14:01", "-12:30", "+02:00:00", "UTC", "Z", ""])
def test_bad_offsets_are_refused(text):
    with pytest.raises(ValueError):
        parse_offset(text)


def test_utc_is_always_there_and_the_configured_offset_comes_second():
    assert period_offsets(None) == (0,)
    assert period_offsets("+00:00") == (0,)
    assert period_offsets("-03:00") == (0, -10800)


@pytest.mark.parametrize("period, offset, t, expected", [
    ("day", 0, T0, (T0, T0 + DAY)),  # a boundary belongs to the period it starts
    ("day", 0, T0 - 0.001, (T0 - DAY, T0)),
    ("day", 7200, T0 + 22 * 3600, (T0 + 22 * 3600, T0 + 46 * 3600)),  # midnight at +02:00 is 22:00 UTC
    ("day", 7200, T0 + 22 * 3600 - 1e-3, (T0 - 2 * 3600, T0 + 22 * 3600)),
    ("day", -19800, T0, (T0 - DAY + 19800, T0 + 19800)),
    ("month", 0, T0, (DEC_1_2026, JAN_1_2027)),
    ("month", 0, JAN_1_2027, (JAN_1_2027, ts(2027, 2, 1))),
    ("month", 7200, JAN_1_2027 - 7200, (JAN_1_2027 - 7200, ts(2027, 2, 1) - 7200)),
    ("month", 7200, JAN_1_2027 - 7201, (DEC_1_2026 - 7200, JAN_1_2027 - 7200)),
    ("month", 0, ts(2028, 2, 29, 12), (ts(2028, 2, 1), ts(2028, 3, 1))),  # leap year
    ("month", -19800, ts(2027, 3, 1, 3), (ts(2027, 2, 1, 5, 30), ts(2027, 3, 1, 5, 30))),
])
def test_period_bounds(period, offset, t, expected):
    assert period_bounds(period, offset, t) == expected


def test_a_step_inside_the_cached_segment_is_itself_and_one_across_midnights_is_cut_exactly():
    cal = PeriodCalendar((0, 7200))
    inside = EnergyStep(T0 + 100.25, T0 + 101.5, 123.456)
    assert cal.pieces(inside) == (inside,)
    assert cal.pieces(inside)[0] is inside
    # 21:00 UTC on the 25th to 01:00 on the 26th: cut at 22:00 (+02:00 midnight) and 00:00 UTC
    step = EnergyStep(T0 + 21 * 3600 + 0.3, T0 + 25 * 3600 + 0.7, 4000.123)
    pieces = cal.pieces(step)
    assert [(p.start, p.end) for p in pieces] == [(step.start, T0 + 22 * 3600), (T0 + 22 * 3600, T0 + DAY),
                                                  (T0 + DAY, step.end)]
    assert sum((Fraction(p.joules) for p in pieces), Fraction(0)) == Fraction(step.joules)  # exactly
    span = Fraction(step.end) - Fraction(step.start)
    for p in pieces:  # in proportion to time, to the last bit
        share = Fraction(step.joules) * (Fraction(p.end) - Fraction(p.start)) / span
        assert abs(Fraction(p.joules) - share) <= Fraction(2) ** -40
    # a step whose wall clock went backwards is not split: it counts at its end
    back = EnergyStep(T0 + DAY + 5, T0 + DAY - 5, 10.0)
    assert cal.pieces(back) == (back,)


# -- through the sampler --------------------------------------------------------------------------------

class Recorder:
    """Stands where per-workload accounting would: receives every piece as charged, for exact comparison."""

    def __init__(self) -> None:
        self.pieces: list[tuple[EnergyStep, object]] = []

    def on_step(self, gpu, uuid, step, charge, reading) -> None:
        self.pieces.append((step, charge))

    def snapshot(self, now):
        return EMPTY_WORKLOADS

    def export_state(self):
        return {}

    def restore_state(self, data):
        return 0

    def exact(self, since: float, until: float = float("inf")) -> dict[str, object]:
        """Exact sums of the pieces whose start lies in [since, until)."""
        energy = grams = Fraction(0)
        cost: dict[str, Fraction] = {}
        for step, charge in self.pieces:
            if since <= step.start < until:
                energy += Fraction(step.joules)
                grams += Fraction(charge.co2e_grams)
                for currency, amount in charge.cost:
                    cost[currency] = cost.get(currency, Fraction(0)) + Fraction(amount)
        return {"energy_joules": energy, "co2e_grams": grams, "cost": cost}


def grid(clock: Clock, prices: list[tuple[float, float, float]] | None = None, pue: float = 1.0) -> GridSignals:
    price_source = ScriptedSource("tariff", "price", prices, "EUR") if prices else StaticSource(
        "price", "DE", 0.30, "EUR")
    price = SignalChain("price", "DE", 30 * DAY, [price_source], clock=clock.time)
    carbon = SignalChain("carbon", "DE", 30 * DAY, [StaticSource("carbon", "DE", 400.0, None)], clock=clock.time)
    price.poll_due()
    carbon.poll_due()
    return GridSignals(pue=pue, carbon=carbon, price=price)


def make(clock: Clock, watts=(1000.0, 500.0), offsets=(0,), prices=None, pue: float = 1.0):
    gpus = [ConstantGpu(i, clock, w) for i, w in enumerate(watts)]
    sampler = Sampler(ListBackend(gpus), grid=grid(clock, prices, pue), clock=clock.time, period_offsets=offsets)
    sampler.start_backend()
    recorder = Recorder()
    sampler.workloads = recorder
    sampler.sample_round()  # baseline readings
    return sampler, recorder, gpus


def rounds(sampler: Sampler, clock: Clock, steps) -> None:
    for dt in steps:
        clock.advance(dt)
        sampler.sample_round()


def totals(sampler: Sampler, period: str, offset: str = UTC):
    return next(t for t in sampler.snapshot.periods if t.period == period and t.offset == offset)


def assert_exact(sampler: Sampler, recorder: Recorder, period: str, offset: str = UTC) -> None:
    """The period's total is exactly the sum of the pieces since its start."""
    mine = sampler.periods.exact()[(period, offset)]
    theirs = recorder.exact(mine["start"])
    assert mine["energy_joules"] == theirs["energy_joules"]
    assert mine["co2e_grams"] == theirs["co2e_grams"]
    assert {c: v for c, v in mine["cost"].items()} == theirs["cost"]


def scrape(sampler: Sampler) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = Exposition().render(sampler.snapshot).text.decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_a_step_across_utc_midnight_is_split_and_priced_on_each_side():
    clock = Clock(T0 - 10.5)
    prices = [(T0 - DAY, T0, 0.30), (T0, T0 + DAY, 0.50)]
    sampler, recorder, _ = make(clock, prices=prices)
    rounds(sampler, clock, [1.0] * 16)  # ... T0 - 0.5, T0 + 0.5 (across midnight), ..., T0 + 5.5
    day, month = totals(sampler, "day"), totals(sampler, "month")
    assert (day.start, month.start) == (T0, DEC_1_2026)
    assert day.energy_joules == 1500 * 5.5  # 1.5 kW since midnight, exactly
    assert month.energy_joules == 1500 * 16.0
    assert dict(day.cost)["EUR"] == pytest.approx(1500 * 5.5 / 3.6e6 * 0.50, rel=1e-12)  # today's price only
    assert dict(month.cost)["EUR"] == pytest.approx(1500 / 3.6e6 * (10.5 * 0.30 + 5.5 * 0.50), rel=1e-12)
    assert day.co2e_grams == pytest.approx(1500 * 5.5 / 3.6e6 * 400, rel=1e-12)
    for period in ("day", "month"):
        assert_exact(sampler, recorder, period)
    # the straddling step of each GPU became two pieces: one before midnight, one after
    assert sum(1 for step, _ in recorder.pieces if step.end == T0) == 2
    assert sum(1 for step, _ in recorder.pieces if step.start == T0) == 2
    m = scrape(sampler)
    assert {(lb["period"], lb["offset"]): v for lb, v in m["wattson_period_start_timestamp_seconds"]} == {
        ("day", UTC): T0, ("month", UTC): DEC_1_2026}
    assert {(lb["period"], lb["offset"], lb["currency"]) for lb, _ in m["wattson_period_cost"]} == {
        ("day", UTC, "EUR"), ("month", UTC, "EUR")}
    assert {(lb["period"], lb["offset"]): v for lb, v in m["wattson_period_energy_joules"]}[("day", UTC)] == 8250.0


def test_a_step_across_the_month_end_starts_the_month_and_the_day():
    clock = Clock(JAN_1_2027 - 2.25)
    sampler, recorder, _ = make(clock, watts=(800.0,))
    rounds(sampler, clock, [1.0, 1.5, 1.0])  # JAN_1 - 1.25, + 0.25 (across), + 1.25
    day, month = totals(sampler, "day"), totals(sampler, "month")
    assert (day.start, month.start) == (JAN_1_2027, JAN_1_2027)
    assert day.energy_joules == month.energy_joules == 800 * 1.25
    for period in ("day", "month"):
        assert_exact(sampler, recorder, period)


def test_midnight_at_a_fixed_offset_starts_that_day_only():
    local_midnight = T0 + 22 * 3600  # 00:00 on the 26th at +02:00
    clock = Clock(local_midnight - 3.5)
    sampler, recorder, _ = make(clock, offsets=(0, 7200))
    rounds(sampler, clock, [1.0] * 6)  # ... -0.5, +0.5 (across), ..., +2.5
    assert {(t.period, t.offset, t.start) for t in sampler.snapshot.periods} == {
        ("day", UTC, T0), ("month", UTC, DEC_1_2026),
        ("day", "+02:00", local_midnight), ("month", "+02:00", DEC_1_2026 - 7200)}
    assert totals(sampler, "day", "+02:00").energy_joules == 1500 * 2.5
    assert totals(sampler, "day", UTC).energy_joules == 1500 * 6.0
    assert totals(sampler, "month", "+02:00").energy_joules == 1500 * 6.0
    for key in [("day", UTC), ("month", UTC), ("day", "+02:00"), ("month", "+02:00")]:
        assert_exact(sampler, recorder, *key)
    m = scrape(sampler)
    assert {(lb["period"], lb["offset"]) for lb, _ in m["wattson_period_co2e_grams"]} == {
        ("day", UTC), ("month", UTC), ("day", "+02:00"), ("month", "+02:00")}


def test_exact_over_many_irregular_steps_across_days_a_month_end_and_negative_prices():
    """Three days with steps from 50 ms to over an hour, hourly prices of both signs, two offsets: every period
    total equals the exact (Fraction) sum of the pieces since its start, at every step."""
    start = JAN_1_2027 - 2 * DAY - 1234.5
    prices = [(h, h + 3600, ((h // 3600) % 7 - 2) * 0.07) for h in range(JAN_1_2027 - 3 * DAY, JAN_1_2027 + 2 * DAY,
                                                                        3600)]
    clock = Clock(start)
    sampler, recorder, _ = make(clock, watts=(700.0, 333.3), offsets=(0, -19800), prices=prices, pue=1.37)
    pattern = [0.05, 61.7, 3600.3, 0.9, 1234.567, 7.25, 2999.9]
    i = 0
    while clock.now < JAN_1_2027 + 0.2 * DAY:  # 04:48 UTC: 23:18 on December 31 at -05:30
        rounds(sampler, clock, [pattern[i % len(pattern)]])
        i += 1
        if i % 25 == 0:
            for key in [("day", UTC), ("month", UTC), ("day", "-05:30"), ("month", "-05:30")]:
                assert_exact(sampler, recorder, *key)
    for key in [("day", UTC), ("month", UTC), ("day", "-05:30"), ("month", "-05:30")]:
        assert_exact(sampler, recorder, *key)
    assert totals(sampler, "month", UTC).start == JAN_1_2027
    assert totals(sampler, "month", "-05:30").start == DEC_1_2026 + 19800  # still December there
    net = dict(totals(sampler, "month", "-05:30").cost)["EUR"]
    paid = dict(sampler.snapshot.gpus[0].account.cost)["EUR"] + dict(sampler.snapshot.gpus[1].account.cost)["EUR"]
    assert net < paid  # credits at negative prices are netted
    # no piece spans a boundary of either offset
    for step, _ in recorder.pieces:
        for offset in (0, -19800):
            assert period_bounds("day", offset, step.start)[1] >= step.end


def test_a_day_without_any_step_still_starts_at_midnight():
    clock = Clock(T0 - 5)
    sampler, _, gpus = make(clock, watts=(1000.0,))
    rounds(sampler, clock, [1.0] * 3)
    from wattson.gpu.base import GpuReadError

    gpus[0].fail_with = GpuReadError("gpu_lost", "lost")
    rounds(sampler, clock, [1.0] * 5)  # T0 + 3: no step since T0 - 2
    day, month = totals(sampler, "day"), totals(sampler, "month")
    assert (day.start, day.energy_joules, dict(day.cost)) == (T0, 0.0, {"EUR": 0.0})
    assert month.energy_joules == 3000.0


def test_period_totals_are_the_sum_over_gpus():
    clock = Clock(T0 + 100)
    sampler, _, _ = make(clock, watts=(100.0, 200.0, 300.0))
    rounds(sampler, clock, [2.0] * 3)
    assert totals(sampler, "day").energy_joules == 600.0 * 6
    assert sum(g.energy_joules for g in sampler.snapshot.gpus) == 600.0 * 6


def test_the_snapshot_view_is_immutable_and_reused_while_nothing_changes():
    periods = HostPeriods((0,))
    first = periods.snapshot(T0 + 10)
    assert periods.snapshot(T0 + 11) is first
    assert periods.snapshot(T0 + DAY + 1)[0].start == T0 + DAY  # a new day without any piece
    with pytest.raises(AttributeError):
        first[0].energy_joules = 1.0  # type: ignore[misc]


# -- restarts ---------------------------------------------------------------------------------------------

class Host:
    """One host's GPU (its counter runs whether wattson runs or not) and the wattson runs on it."""

    def __init__(self, tmp_path: Path, start: float, watts: float = 500.0) -> None:
        self.clock = Clock(start)
        self.gpu = ConstantGpu(0, self.clock, watts)
        self.backend = ListBackend([self.gpu])
        self.storage = tmp_path / "state"
        self.recorder = Recorder()

    def run(self, seconds: int, offsets=(0,)) -> Sampler:
        sampler = Sampler(self.backend, grid=grid(self.clock), clock=self.clock.time, period_offsets=offsets)
        sampler.start_backend()
        sampler.workloads = self.recorder
        store = StateStore(str(self.storage), clock=self.clock.time)
        saved = store.load({self.gpu.identity.uuid})
        if saved is not None:
            sampler.restore(saved)
        sampler.sample_round()
        rounds(sampler, self.clock, [1.0] * seconds)
        assert store.save(sampler.state_document() or {})
        return sampler


def test_a_restart_within_the_period_continues_its_totals(tmp_path):
    host = Host(tmp_path, T0 + 3600)
    first = host.run(10)
    assert totals(first, "day").energy_joules == 5000.0
    host.clock.advance(20)  # down for 20 s: the counter keeps counting and the gap is one step at restart
    second = host.run(10)
    assert totals(second, "day").energy_joules == 500.0 * 40
    assert totals(second, "month").energy_joules == 500.0 * 40
    assert dict(totals(second, "day").cost)["EUR"] == pytest.approx(500.0 * 40 / 3.6e6 * 0.30, rel=1e-12)
    doc = json.loads((host.storage / FILE_NAME).read_text())
    assert {(e["period"], e["offset"], e["start"]) for e in doc["periods"]} == {("day", UTC, T0),
                                                                                   ("month", UTC, DEC_1_2026)}


def test_a_restart_in_a_later_period_starts_it_at_zero_and_splits_the_gap_at_the_boundary(tmp_path):
    host = Host(tmp_path, T0 - 30)
    first = host.run(10)  # until T0 - 20
    assert totals(first, "day").start == T0 - DAY
    host.clock.advance(40)  # down across midnight, until T0 + 20
    second = host.run(10)
    day, month = totals(second, "day"), totals(second, "month")
    assert day.start == T0 and day.energy_joules == 500.0 * 30  # the gap's 20 s after midnight and 10 s since
    assert month.energy_joules == 500.0 * 60  # the same month: continued, with all of the gap
    assert second.snapshot.gpus[0].energy_joules == 500.0 * 60


def test_a_restart_in_a_later_month_starts_the_month_at_zero(tmp_path):
    host = Host(tmp_path, JAN_1_2027 - 100)
    host.run(10)
    host.clock.advance(DAY)  # down for a day, into January
    second = host.run(10)
    month = totals(second, "month")
    assert month.start == JAN_1_2027
    # the gap step (one day) is split at midnight: January gets its share only
    assert month.energy_joules == pytest.approx(500.0 * (DAY - 90 + 10), rel=1e-12)
    assert_exact(second, host.recorder, "month")


def test_saved_totals_of_another_period_or_malformed_are_not_restored(tmp_path):
    periods = HostPeriods((0,))
    good = {"period": "day", "offset": UTC, "start": T0, "energy_joules": 10.0, "cost": {"EUR": -0.5},
            "co2e_grams": 1.0}
    stale = dict(good, period="month", start=DEC_1_2026 - 30 * DAY)
    bad = [{"period": "week"}, "x", dict(good, energy_joules=float("nan")), dict(good, cost=[1]),
           dict(good, energy_joules=-1.0)]
    assert periods.restore([good, stale, *bad], T0 + 5) == len(bad)
    view = {(t.period, t.offset): t for t in periods.snapshot(T0 + 6)}
    assert view[("day", UTC)].energy_joules == 10.0 and dict(view[("day", UTC)].cost) == {"EUR": -0.5}
    assert view[("month", UTC)].energy_joules == 0.0 and view[("month", UTC)].start == DEC_1_2026
    # a state file with no or a broken periods entry still loads
    doc = {"format": "wattson-state", "version": 1, "written_at": 1, "gpus": {}, "periods": {"not": "a list"}}
    assert parse_state(json.dumps(doc)).periods == []


def test_a_newly_configured_offset_starts_from_the_restart(tmp_path):
    host = Host(tmp_path, T0 + 3600)
    host.run(10)
    second = host.run(10, offsets=(0, 3600))
    assert totals(second, "day", UTC).energy_joules == 500.0 * 20
    assert totals(second, "day", "+01:00").energy_joules == 500.0 * 10  # counted since it exists
