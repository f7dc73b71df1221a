"""Sources' data and counters saved and read back across a restart (GridSignals.export_state/restore_state)."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from tests.fakes import T0, Clock, ScriptedSource
from wattson.config import Config
from wattson.grid import electricitymaps, static
from wattson.grid.base import SourceError
from wattson.grid.registry import build_grid
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.state import MAX_SAVED_INTERVALS

HOUR = 3600.0
EM = electricitymaps.Config(type="electricitymaps", use_forecast=False)
FALLBACK = static.StaticCarbonConfig(type="static", grams_per_kwh=400)
TARIFF = static.StaticPriceConfig(type="static", price_per_kwh=0.3, currency="EUR")


class Daemon:
    """One run of the daemon: the same configured sources, fresh objects (as after a restart)."""

    def __init__(self, clock: Clock, price_currency: str = "EUR") -> None:
        self.api = ScriptedSource("electricitymaps", "carbon", [(T0, T0 + HOUR, 300.0), (T0 + HOUR, T0 + 2 * HOUR,
                                                                                         320.0)])
        self.fallback = ScriptedSource("static", "carbon", [(0.0, 4102444800.0, 400.0)])
        self.tariff = ScriptedSource("static", "price", [(T0, T0 + HOUR, 0.3)], price_currency)
        self.grid = GridSignals(
            pue=1.2,
            carbon=SignalChain("carbon", "DE", 7200, [self.api, self.fallback], clock=clock.time,
                               configs=[EM, FALLBACK]),
            price=SignalChain("price", "DE", 7200, [self.tariff], clock=clock.time, configs=[TARIFF]))

    def poll(self) -> None:
        for chain in self.grid.chains:
            chain.poll_due()

    def calls(self) -> tuple[int, int, int]:
        return self.api.calls, self.fallback.calls, self.tariff.calls


def saved_after_a_failure(clock: Clock) -> tuple[Daemon, dict[str, Any]]:
    first = Daemon(clock)
    first.poll()
    first.api.error = SourceError("http_5xx", "electricitymaps: HTTP 500")
    clock.advance(600)  # the API's next poll: it fails, its data still serve
    first.poll()
    return first, json.loads(json.dumps(first.grid.export_state()))


def test_round_trip_through_json_serves_at_once_without_refetching() -> None:
    clock = Clock(T0 + 60)
    first, data = saved_after_a_failure(clock)
    clock.advance(30)  # the restart
    second = Daemon(clock)
    assert second.grid.restore_state(data) == []
    assert second.grid.now(clock.time()) == first.grid.now(clock.time())
    assert second.grid.export_state() == first.grid.export_state()
    signals, sources = second.grid.now(clock.time())
    assert [(s.signal, s.value, s.source) for s in signals] == [("carbon", 300.0, "electricitymaps"),
                                                                ("price", 0.3, "static")]
    assert dict(sources[0].errors) == {"http_5xx": 1} and sources[0].source == "electricitymaps"
    second.poll()
    # The fallback and the tariff were fetched 30 s before the restart: due a poll interval (60 s) after
    # that, not now. The API's cache is from before its failure: its poll interval has passed, so it is due.
    assert second.calls() == (1, 0, 0)


def test_keys_name_signal_zone_position_type_and_config() -> None:
    clock = Clock(T0)
    keys = list(Daemon(clock).grid.export_state()["sources"])
    assert [k.rsplit("/", 1)[0] for k in keys] == ["carbon/DE/0/electricitymaps", "carbon/DE/1/static",
                                                   "price/DE/0/static"]
    assert all(len(k.rsplit("/", 1)[1]) == 16 for k in keys)


def test_stale_restored_cache_is_not_served_and_is_refetched() -> None:
    clock = Clock(T0 + 60)
    _, data = saved_after_a_failure(clock)
    clock.advance(7300)  # down longer than max_age
    later = Daemon(clock)
    later.api.intervals = [(T0 + 7900, T0 + 9000, 333.0)]
    assert later.grid.restore_state(data) == []
    assert later.grid.carbon is not None
    assert later.grid.carbon.state.value_at(T0 + 700, clock.time()) is None  # stale: max_age as usual
    later.poll()
    assert later.calls() == (1, 1, 1)
    _, sources = later.grid.now(clock.time())
    assert dict(sources[0].errors) == {"http_5xx": 1}  # counters restored all the same


def corrupt(data: dict[str, Any], key_prefix: str, change: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    key = next(k for k in out["sources"] if k.startswith(key_prefix))
    change(out["sources"][key])
    return out


def _set(path: str, value: Any) -> Any:
    def change(entry: dict[str, Any]) -> None:
        target = entry
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return change


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("cache.intervals.0.2", math.nan, "value is not finite"),
    ("cache.intervals.0.2", "300", "value is not a number"),
    ("cache.intervals.0.2", 9000.0, "outside [0, 5000]"),
    ("cache.intervals.0.1", T0 - 10, "ends before it starts"),
    ("cache.intervals.0.3", "yes", "true or false"),
    ("cache.intervals.0", [T0, T0 + 1], "not [start, end, value, estimated, forecast, origin]"),
    ("cache.intervals", [], "empty"),
    ("cache.intervals", [[T0, T0 + 1, 1.0, False, False]] * (MAX_SAVED_INTERVALS + 1), "more than"),
    ("cache.intervals", {"a": 1}, "not a list"),
    ("cache.fetched_at", None, "fetched_at is not a number"),
    ("cache.fetched_at", T0 + 10 ** 6, "in the future"),
    ("cache.fetched_at", 10 ** 400, "not finite"),
    ("cache.currency", "EUR", "set for a carbon source"),
    ("cache", [1, 2], "cache is not a mapping"),
    ("errors", {"nonsense": 1}, "unknown reason"),
    ("errors", {"timeout": -1}, "not a count"),
    ("errors", {"timeout": True}, "not a count"),
    ("up", "yes", "up is not"),
    ("last_success", "yesterday", "last_success is not a number"),
])
def test_corrupt_entry_is_skipped_and_described(path: str, value: Any, needle: str) -> None:
    clock = Clock(T0 + 60)
    _, data = saved_after_a_failure(clock)
    bad = corrupt(data, "carbon/DE/0/", _set(path, value))
    later = Daemon(clock)
    problems = later.grid.restore_state(bad)
    assert len(problems) == 1 and needle in problems[0] and problems[0].startswith("grid state: carbon/DE/0/"), \
        problems
    assert "\n" not in problems[0]
    assert later.grid.carbon is not None and later.grid.price is not None
    assert later.grid.carbon.state.caches[0] is None and later.grid.carbon.state.statuses[0].errors == {}
    assert later.grid.carbon.state.caches[1] is not None  # the other entries are restored
    assert later.grid.price.state.caches[0] is not None


def test_price_entry_is_checked_against_its_currency() -> None:
    clock = Clock(T0 + 60)
    _, data = saved_after_a_failure(clock)
    for value, currency, ok in ((150.0, "EUR", False), (150.0, "KRW", True), (0.3, "euro", False),
                                (0.3, None, False)):
        def change(entry: dict[str, Any], v: float = value, c: str | None = currency) -> None:
            entry["cache"]["intervals"][0][2] = v
            entry["cache"]["currency"] = c
        problems = Daemon(clock).grid.restore_state(corrupt(data, "price/", change))
        assert (problems == []) is ok, (value, currency, problems)


@pytest.mark.parametrize("data", [None, [], "state", 42, {"version": 2, "sources": {}}, {"version": 1},
                                  {"version": True, "sources": {}},
                                  {"version": 1, "sources": []}, {"sources": {}},
                                  {"version": 1, "sources": {"carbon/DE/0/x/y": {"cache": "junk"}}}])
def test_unusable_file_restores_nothing_and_never_raises(data: Any) -> None:
    daemon = Daemon(Clock(T0))
    problems = daemon.grid.restore_state(data)
    assert all("\n" not in p for p in problems)
    assert daemon.grid.carbon is not None and all(c is None for c in daemon.grid.carbon.state.caches)


def test_nothing_saved_is_not_a_problem() -> None:
    assert Daemon(Clock(T0)).grid.restore_state({}) == []


def test_changed_config_ignores_the_old_entry() -> None:
    def cfg(price: float, grams: float) -> Config:
        return Config.model_validate({"grid": {
            "carbon": {"sources": [{"type": "static", "grams_per_kwh": grams}, {"type": "bundled"}]},
            "price": {"sources": [{"type": "static", "price_per_kwh": price, "currency": "EUR"}]}}})

    before = build_grid(cfg(0.30, 300))
    for chain in before.chains:
        chain.poll_due()
    data = json.loads(json.dumps(before.export_state()))
    after = build_grid(cfg(0.35, 300))  # the tariff changed, the carbon sources did not
    assert after.restore_state(data) == []
    assert after.carbon is not None and after.price is not None
    assert [c is not None for c in after.carbon.state.caches] == [True, True]
    assert after.price.state.caches[0] is None  # the old tariff is not served under the new config
    assert after.price.state.statuses[0].up is None


def test_restore_after_a_fetch_keeps_the_newer_data() -> None:
    clock = Clock(T0 + 60)
    _, data = saved_after_a_failure(clock)
    clock.advance(60)
    running = Daemon(clock)
    running.api.intervals = [(T0, T0 + HOUR, 310.0)]
    running.poll()
    assert running.grid.restore_state(data) == []
    assert running.grid.carbon is not None
    assert running.grid.carbon.state.value_at(clock.time(), clock.time()).value == 310.0  # type: ignore[union-attr]
    assert running.grid.carbon.state.statuses[0].errors == {"http_5xx": 1}


def test_a_hubs_provenance_survives_the_round_trip():
    from wattson.grid.base import FetchResult, Interval
    from wattson.grid.signal import GridSignals, SignalChain

    class Hub:
        name, signal, zone, poll_interval_seconds = "wattson", "carbon", "DE", 60.0

        def fetch(self, now: float) -> FetchResult:
            return FetchResult((Interval(now - 600, now + 3000, 321.0, origin="electricitymaps"),))

        def secrets(self) -> tuple[str, ...]:
            return ()

    now = 1_800_000_000.0
    chain = SignalChain("carbon", "DE", 7200, [Hub()], clock=lambda: now)
    chain.poll_due()
    saved = json.loads(json.dumps(GridSignals(carbon=chain).export_state()))
    fresh = SignalChain("carbon", "DE", 7200, [Hub()], clock=lambda: now)
    grid = GridSignals(carbon=fresh)
    assert grid.restore_state(saved, now=now) == []
    (signal,), _sources = grid.now(now)
    assert signal.value == 321.0 and signal.source == "electricitymaps" and signal.via == "wattson"
