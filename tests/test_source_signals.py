"""What the chains report (GridSignals.now), how build_grid wires sources, and how failures back off."""

from __future__ import annotations

import logging
import time

import pytest

from tests.fakes import T0, Clock, ScriptedSource
from wattson.config import Config, ConfigError
from wattson.grid import electricitymaps, entsoe, octopus, static, watttime
from wattson.grid.base import MissingSecret, SourceError
from wattson.grid.registry import build_grid
from wattson.grid.signal import MIN_BACKOFF_SECONDS, GridSignals, SignalChain, SignalNow, SourceSnapshot
from wattson.logfmt import LogfmtFormatter

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


def test_recovery_is_logged_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    source = ScriptedSource("api", "carbon", HOUR)
    source.error = SourceError("http_5xx", "api: HTTP 500")
    chain = SignalChain("carbon", "DE", 7200, [source], clock=clock.time)
    with caplog.at_level(logging.DEBUG, logger="wattson.grid"):
        for _ in range(3):
            chain.poll_due()
            clock.advance(chain._next_poll[0] - clock.time())
        source.error = None
        chain.poll_due()
        clock.advance(chain._next_poll[0] - clock.time())
        chain.poll_due()
    recovered = [r for r in caplog.records if r.getMessage() == "source recovered"]
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    fields = recovered[0].kv  # type: ignore[attr-defined]
    assert (fields["source"], fields["signal"], fields["failures"]) == ("api", "carbon", 3)
    # Down from the first failure (T0) to the success: three backoff waits of at most 5, 10 and 20 s.
    assert 5 / 2 + 10 / 2 + 20 / 2 <= fields["down_seconds"] <= 5 + 10 + 20


CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, so a request is refused at once


@pytest.mark.parametrize(("make", "variable"), [
    (lambda: electricitymaps.build(electricitymaps.Config(type="electricitymaps", base_url=CLOSED,
                                                          api_key_env="WATTSON_NO_SUCH_KEY"), "DE"),
     "WATTSON_NO_SUCH_KEY"),
    (lambda: entsoe.build(entsoe.Config(type="entsoe", base_url=CLOSED, api_key_env="WATTSON_NO_SUCH_KEY"), "DE"),
     "WATTSON_NO_SUCH_KEY"),
    (lambda: watttime.build(watttime.Config(type="watttime", base_url=CLOSED, username="u",
                                            password_env="WATTSON_NO_SUCH_PW"), "CAISO_NORTH"),
     "WATTSON_NO_SUCH_PW"),
])
def test_missing_api_key_is_said_once_then_counted_quietly(make, variable: str, caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(variable, raising=False)
    clock = Clock(T0)
    source = make()
    chain = SignalChain(source.signal, "DE", 7200, [source], clock=clock.time)

    def poll(times: int) -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="wattson.grid"):
            for _ in range(times):
                chain.poll_due()
                clock.advance(chain._next_poll[0] - clock.time())
        return [r for r in caplog.records if r.levelno >= logging.WARNING]

    warnings = poll(5)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    fields = warnings[0].kv  # type: ignore[attr-defined]
    assert fields["source"] == source.name and variable in fields["err"] and fields["reason"] == "auth"
    assert chain.state.statuses[0].errors == {"auth": 5} and chain.state.statuses[0].up is False
    # With a key, the next failure is news again, and the key appears nowhere.
    monkeypatch.setenv(variable, "some-key-value")
    warnings = poll(1)
    assert [r.kv["reason"] for r in warnings] == ["connection"]  # type: ignore[attr-defined]
    assert all("some-key-value" not in LogfmtFormatter().format(r) for r in caplog.records)


def test_unreadable_key_file_does_not_stop_the_start(tmp_path) -> None:
    missing = str(tmp_path / "nope.key")
    for source in (entsoe.build(entsoe.Config(type="entsoe", api_key_env=None, api_key_file=missing), "DE"),
                   octopus.build(octopus.Config(type="octopus", product_code="AGILE-24-10-01",
                                                tariff_code="E-1R-AGILE-24-10-01-C", api_key_file=missing), "GB")):
        with pytest.raises(MissingSecret) as info:
            source.fetch(T0)
        assert info.value.reason == "auth" and missing in str(info.value)


def test_describe_names_each_chain_and_disabled_signals() -> None:
    cfg = Config.model_validate({"grid": {
        "carbon": {"zone": "DE", "sources": [{"type": "electricitymaps"}, {"type": "bundled"}]},
        "price": None}})
    grid = build_grid(cfg)
    assert grid.describe() == "carbon=DE:electricitymaps>bundled price=disabled"
    assert grid.is_disabled("price") and not grid.is_disabled("carbon")
    assert build_grid(Config()).describe() == "carbon=DE:bundled price=DE:static"


@pytest.mark.parametrize(("value", "currency", "limit", "ok"), [
    (150.0, "KRW", None, True),
    (150.0, "EUR", None, False),
    (-150.0, "EUR", None, False),
    (150.0, "EUR", 200.0, True),
    (300_000.0, "KRW", None, False),
    (float("nan"), "EUR", None, False),
])
def test_fetched_prices_are_bounded_by_currency(value: float, currency: str, limit: float | None, ok: bool) -> None:
    clock = Clock(T0 + 60)
    source = ScriptedSource("api", "price", [(T0, T0 + 3600, value)], currency)
    cfg = static.StaticPriceConfig(type="static", price_per_kwh=0.1, currency="EUR", max_abs_price_per_kwh=limit)
    chain = SignalChain("price", "DE", 7200, [source], clock=clock.time, configs=[cfg])
    chain.poll_due()
    assert chain.state.statuses[0].up is ok
    if not ok:
        assert chain.state.statuses[0].errors == {"invalid_value": 1}


def test_a_korean_tariff_is_served() -> None:
    cfg = Config.model_validate({"grid": {"price": {"zone": "KR", "sources": [
        {"type": "static", "price_per_kwh": 150, "currency": "KRW"}]}}})
    grid = build_grid(cfg)
    assert grid.price is not None
    grid.price.poll_due()
    signals, _ = grid.now(time.time())
    assert [(s.value, s.currency) for s in signals if s.signal == "price"] == [(150.0, "KRW")]
