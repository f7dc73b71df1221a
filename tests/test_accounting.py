"""Cost and CO2e: each joule priced at the value in force when it was used."""

from __future__ import annotations

import pytest

from tests.fakes import T0, Clock, ConstantGpu, ListBackend, ScriptedSource, run_for
from wattson.grid.base import SourceError
from wattson.grid.signal import GridSignals, SignalChain
from wattson.sampler import Sampler


def make(clock: Clock, price_sources, carbon_sources, pue: float = 1.0, watts: float = 1000.0, counter=True):
    gpu = ConstantGpu(0, clock, watts, counter)
    price = SignalChain("price", "DE", 7200, price_sources, clock=clock.time)
    carbon = SignalChain("carbon", "DE", 7200, carbon_sources, clock=clock.time)
    price.poll_due()
    carbon.poll_due()
    grid = GridSignals(pue=pue, carbon=carbon, price=price)
    sampler = Sampler(ListBackend([gpu]), grid=grid, clock=clock.time)
    sampler.start_backend()
    sampler.sample_round()  # baseline reading
    return sampler, gpu, price, carbon


def halves():
    price = ScriptedSource("tariff", "price", [(T0, T0 + 1800, 0.20), (T0 + 1800, T0 + 3600, 0.40)], "EUR")
    carbon = ScriptedSource("grid", "carbon", [(T0, T0 + 1800, 300.0), (T0 + 1800, T0 + 3600, 500.0)])
    return price, carbon


@pytest.mark.parametrize("step", [1.0, 7.0, 0.5])
def test_one_kw_for_one_hour_with_a_price_change_at_half_past(step):
    clock = Clock()
    sampler, *_ = make(clock, *[[s] for s in halves()])
    run_for(sampler, clock, 3600, step)
    gpu = sampler.snapshot.gpus[0]
    assert gpu.energy_joules == 3_600_000.0  # 1 kWh
    cost = dict(gpu.account.cost)["EUR"]
    assert cost == pytest.approx(0.5 * 0.20 + 0.5 * 0.40, abs=1e-12)
    assert gpu.account.co2e_grams == pytest.approx(0.5 * 300 + 0.5 * 500, abs=1e-9)
    assert dict(gpu.account.unpriced_joules) == {"price": 0.0, "carbon": 0.0}


def test_sample_on_the_boundary_is_priced_once():
    """A step ending exactly at half past is all old price; the next step is all new price."""
    clock = Clock(T0 + 1799)
    sampler, *_ = make(clock, *[[s] for s in halves()])
    clock.advance(1)  # step [1799, 1800]
    sampler.sample_round()
    assert dict(sampler.snapshot.gpus[0].account.cost)["EUR"] == pytest.approx(1000 / 3.6e6 * 0.20, rel=1e-12)
    clock.advance(1)  # step [1800, 1801]
    sampler.sample_round()
    assert dict(sampler.snapshot.gpus[0].account.cost)["EUR"] == pytest.approx(1000 / 3.6e6 * 0.60, rel=1e-12)


def test_pue_multiplies_cost_and_grams_not_gpu_energy():
    clock = Clock()
    sampler, *_ = make(clock, *[[s] for s in halves()], pue=1.5)
    run_for(sampler, clock, 1800, 10)
    gpu = sampler.snapshot.gpus[0]
    assert gpu.energy_joules == 1_800_000.0
    assert dict(gpu.account.cost)["EUR"] == pytest.approx(0.75 * 0.20, abs=1e-12)
    assert gpu.account.co2e_grams == pytest.approx(0.75 * 300, abs=1e-9)


def test_negative_prices_go_to_the_credit_counter():
    clock = Clock()
    price = ScriptedSource("da", "price", [(T0, T0 + 1800, 0.10), (T0 + 1800, T0 + 3600, -0.05)], "EUR")
    carbon = ScriptedSource("grid", "carbon", [(T0, T0 + 3600, 100.0)])
    sampler, *_ = make(clock, [price], [carbon])
    run_for(sampler, clock, 3600, 60)
    acc = sampler.snapshot.gpus[0].account
    assert dict(acc.cost)["EUR"] == pytest.approx(0.05, abs=1e-12)
    assert dict(acc.credit)["EUR"] == pytest.approx(0.025, abs=1e-12)


def test_unknown_price_is_counted_as_unpriced_energy_never_as_zero_cost():
    clock = Clock()
    price = ScriptedSource("da", "price", [(T0, T0 + 1800, 0.10)], "EUR")  # nothing after half past
    carbon = ScriptedSource("grid", "carbon", [(T0, T0 + 3600, 100.0)])
    sampler, *_ = make(clock, [price], [carbon])
    run_for(sampler, clock, 3600, 10)
    acc = sampler.snapshot.gpus[0].account
    assert dict(acc.cost)["EUR"] == pytest.approx(0.05, abs=1e-12)
    assert dict(acc.unpriced_joules)["price"] == pytest.approx(1_800_000.0)
    price_now = [s for s in sampler.snapshot.signals if s.signal == "price"][0]
    assert price_now.value is None  # exported as absent, not 0


def test_live_source_fails_then_fallback_serves_then_recovery_switches_back():
    clock = Clock()
    live = ScriptedSource("live", "carbon", [(T0 + h * 3600, T0 + (h + 1) * 3600, 200.0) for h in range(5)])
    fallback = ScriptedSource("bundled", "carbon", [(T0 - 86400, T0 + 86400, 400.0)])
    price = ScriptedSource("flat", "price", [(T0 - 86400, T0 + 86400, 0.30)], "EUR")
    sampler, gpu, price_chain, carbon = make(clock, [price], [live, fallback])
    carbon.max_age = 600  # live data older than 10 min is stale

    def active() -> str | None:
        return [s for s in sampler.snapshot.signals if s.signal == "carbon"][0].source

    def index() -> int | None:
        return [s for s in sampler.snapshot.signals if s.signal == "carbon"][0].source_index

    run_for(sampler, clock, 300, 1)
    assert active() == "live" and index() == 0
    grams_before = sampler.snapshot.gpus[0].account.co2e_grams
    assert grams_before == pytest.approx(300 * 1000 / 3.6e6 * 200)

    live.error = SourceError("http_5xx", "live: GET /v3: HTTP 500")
    run_for(sampler, clock, 1200, 1, between=lambda _: carbon.poll_due())
    assert active() == "bundled" and index() == 1
    # every second was counted once: 300 s at 200 g, then live data served until it was 600 s old, then 400 g.
    status = {s.source: s for s in sampler.snapshot.sources}
    assert status["live"].up is False and dict(status["live"].errors)["http_5xx"] >= 1
    grams_mid = sampler.snapshot.gpus[0].account.co2e_grams
    fresh_until = max(s for s in [T0]) + 600  # last good fetch at T0 (next polls failed)
    expected = (fresh_until - T0) * 1000 / 3.6e6 * 200 + (T0 + 1500 - fresh_until) * 1000 / 3.6e6 * 400
    assert grams_mid == pytest.approx(expected, rel=1e-9)

    live.error = None
    carbon._next_poll = [0.0, 0.0]  # do not wait for the backoff in the test
    carbon.poll_due()
    run_for(sampler, clock, 10, 1)
    assert active() == "live"
    assert sampler.snapshot.gpus[0].energy_joules == 1510 * 1000.0
    assert sampler.snapshot.gpus[0].account.co2e_grams > grams_mid
