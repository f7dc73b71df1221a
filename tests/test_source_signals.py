"""What the chains report (GridSignals.now), how build_grid wires sources, and how failures back off."""

from __future__ import annotations

import time

import pytest

from tests.fakes import T0, Clock, ScriptedSource
from wattson.config import Config, ConfigError
from wattson.grid.base import SourceError
from wattson.grid.registry import build_grid
from wattson.grid.signal import MIN_BACKOFF_SECONDS, GridSignals, SignalChain, SignalNow, SourceSnapshot

HOUR = [(T0, T0 + 3600, 0.25)]


def chains(clock: Clock, carbon: list[ScriptedSource], price: list[ScriptedSource]) -> GridSignals:
    grid = GridSignals(carbon=SignalChain("carbon", "DE", 7200, carbon, clock=clock.time),
                       price=SignalChain("price", "DE", 7200, price, clock=clock.time))
    for chain in grid.chains:
        chain.poll_due()
    return grid


def test_same_source_type_in_both_chains_is_two_sources() -> None:
    clock = Clock(T0 + 60)
    carbon = ScriptedSource("static", "carbon", [(T0, T0 + 3600, 300.0)])
    price = ScriptedSource("static", "price", HOUR, "EUR")
    price.error = SourceError("no_data", "static: nothing")
    grid = chains(clock, [carbon], [price])
    signals, sources = grid.now(clock.time())
    assert signals == (
        SignalNow("carbon", "DE", 300.0, None, "static", False, 0.0, 0),
        SignalNow("price", "DE", None, None, None, False, None, None),
    )
    assert sources == (
        SourceSnapshot("carbon", "static", True, (), T0 + 60),
        SourceSnapshot("price", "static", False, (("no_data", 1),), None),
    )


def test_same_source_type_twice_in_one_chain_reports_the_worse() -> None:
    clock = Clock(T0 + 60)
    first = ScriptedSource("static", "price", HOUR, "EUR")
    second = ScriptedSource("static", "price", HOUR, "EUR")
    second.error = SourceError("timeout", "static: slow")
    _, sources = chains(clock, [], [first, second]).now(clock.time())
    assert sources == (SourceSnapshot("price", "static", False, (("timeout", 1),), T0 + 60),)


def test_failures_back_off_with_equal_jitter() -> None:
    clock = Clock(T0)
    source = ScriptedSource("api", "carbon", HOUR)
    source.error = SourceError("http_5xx", "api: HTTP 500")
    chain = SignalChain("carbon", "DE", 7200, [source], clock=clock.time)
    for failures in range(1, 5):
        chain.poll_due()
        base = MIN_BACKOFF_SECONDS * 2 ** (failures - 1)
        wait = chain._next_poll[0] - clock.time()
        assert base / 2 <= wait <= base, (failures, wait)
        clock.advance(wait)


def test_build_grid_applies_each_price_sources_adjustments() -> None:
    cfg = Config.model_validate({"grid": {
        "carbon": {"sources": [{"type": "static", "grams_per_kwh": 300}]},
        "price": {"sources": [{"type": "static", "price_per_kwh": 0.25, "currency": "EUR",
                               "adder_per_kwh": 0.05, "multiplier": 2}]}}})
    grid = build_grid(cfg)
    for chain in grid.chains:
        chain.poll_due()  # on the real clock
    signals, _ = grid.now(time.time())
    assert {s.signal: s.value for s in signals} == {"carbon": 300.0, "price": pytest.approx((0.25 + 0.05) * 2)}


def test_build_grid_names_the_source_a_config_error_is_about() -> None:
    cfg = Config.model_validate({"grid": {"price": None, "carbon": {
        "zone": "DE", "sources": [{"type": "static", "grams_per_kwh": 1}, {"type": "bundled", "zone": "XX"}]}}})
    with pytest.raises(ConfigError, match=r"^grid\.carbon\.sources\[1\] \(bundled\): bundled: no bundled"):
        build_grid(cfg)
