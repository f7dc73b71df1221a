"""A reload keeps what is still true: sources whose config did not change keep their data, counters and
schedule; changed and new sources start fresh."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from tests.fakes import T0, Clock, ScriptedSource
from tests.fixture_server import FixtureServer, Request, Response, json_response
from wattson.config import Config
from wattson.grid.base import SourceError
from wattson.grid.registry import build_grid
from wattson.grid.signal import GridSignals, SignalChain

KEY_ENV = "WATTSON_TEST_EM_KEY"
LATEST = "/v3/carbon-intensity/latest"
INTENSITY = {"lifecycle": 362.0, "direct": 250.0}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key-not-secret")


class Api:
    """Electricity Maps' /latest for the current hour; `failing` answers 500 instead."""

    def __init__(self, server: FixtureServer) -> None:
        self.server = server
        self.failing = False
        server.routes[LATEST] = self.latest

    def latest(self, request: Request) -> Response:
        if self.failing:
            return json_response('{"error": "down"}', 500)
        hour = datetime.fromtimestamp(time.time() // 3600 * 3600, timezone.utc)
        kind = request.query["emissionFactorType"][0]
        return json_response(json.dumps({"zone": request.query["zone"][0], "carbonIntensity": INTENSITY[kind],
                                         "datetime": hour.isoformat().replace("+00:00", "Z"),
                                         "isEstimated": False}))

    def calls(self, kind: str | None = None) -> int:
        return sum(1 for r in self.server.requests
                   if r.path == LATEST and (kind is None or r.query["emissionFactorType"] == [kind]))


def config(server: FixtureServer, *, direct_zone: str | None = None, max_age: float = 7200,
           static_grams: float = 300.0, price: Any = "default") -> Config:
    em = {"type": "electricitymaps", "base_url": server.base_url, "api_key_env": KEY_ENV, "use_forecast": False}
    carbon_sources: list[dict[str, Any]] = [em, {**em, "emission_factor_type": "direct"},
                                            {"type": "static", "grams_per_kwh": static_grams}]
    if direct_zone is not None:
        carbon_sources[1]["zone"] = direct_zone
    grid: dict[str, Any] = {"carbon": {"zone": "DE", "max_age_seconds": max_age, "sources": carbon_sources}}
    if price != "default":
        grid["price"] = price
    return Config.model_validate({"grid": grid})


def poll(grid: GridSignals) -> None:
    for chain in grid.chains:
        chain.poll_due()


def carbon_now(grid: GridSignals) -> tuple[float | None, str | None]:
    signals, _ = grid.now(time.time())
    carbon = next(s for s in signals if s.signal == "carbon")
    return carbon.value, carbon.source


def errors_of(grid: GridSignals, source: str) -> dict[str, int]:
    _, sources = grid.now(time.time())
    return dict(next(s for s in sources if s.source == source).errors)


def test_same_config_keeps_cache_counters_and_schedule(server: FixtureServer) -> None:
    api = Api(server)
    cfg = config(server)
    old = build_grid(cfg)
    poll(old)
    assert api.calls() == 2 and carbon_now(old) == (362.0, "electricitymaps")
    # The API breaks while its data are still valid: one failure counted, the data keep serving.
    api.failing = True
    assert old.carbon is not None
    old.carbon._next_poll[0] = 0.0
    old.carbon.poll_due()
    assert errors_of(old, "electricitymaps") == {"http_5xx": 1}
    calls = api.calls()

    new = build_grid(cfg, previous=old)
    old.stop()
    assert carbon_now(new) == (362.0, "electricitymaps")  # served at once, while the API is failing
    assert errors_of(new, "electricitymaps") == {"http_5xx": 1}  # the counter did not reset
    assert new.carbon is not None
    assert new.carbon.state.statuses[0].up is False and new.carbon.state.statuses[1].up is True
    poll(new)
    assert api.calls() == calls  # no source is due: none refetched
    new.start()  # the pollers honour the carried schedule too
    try:
        time.sleep(0.3)
        assert api.calls() == calls
    finally:
        new.stop()


def test_only_the_changed_source_refetches(server: FixtureServer) -> None:
    api = Api(server)
    old = build_grid(config(server))
    poll(old)
    assert (api.calls("lifecycle"), api.calls("direct")) == (1, 1)
    new = build_grid(config(server, direct_zone="DE", static_grams=350.0), previous=old)
    old.stop()
    assert new.carbon is not None
    statuses = new.carbon.state.statuses
    assert [s.up for s in statuses] == [True, None, None]  # the 2nd and 3rd changed: fresh
    poll(new)
    assert (api.calls("lifecycle"), api.calls("direct")) == (1, 2)
    assert new.carbon.state.caches[2] is not None and new.carbon.state.caches[2].intervals[0].value == 350.0


def test_max_age_change_keeps_caches_and_only_brings_the_next_poll_forward(server: FixtureServer) -> None:
    api = Api(server)
    old = build_grid(config(server))
    poll(old)
    assert old.carbon is not None
    next_before = old.carbon._next_poll[0]
    new = build_grid(config(server, max_age=60), previous=old)
    assert new.carbon is not None
    assert carbon_now(new) == (362.0, "electricitymaps")  # kept; fresh under the new max_age too
    fetched = new.carbon.state.caches[0].fetched_at  # type: ignore[union-attr]
    assert new.carbon._next_poll[0] == pytest.approx(min(next_before, fetched + 30))
    calls = api.calls()
    poll(new)
    assert api.calls() == calls


def test_zone_change_starts_every_source_fresh(server: FixtureServer) -> None:
    Api(server)
    old = build_grid(config(server))
    poll(old)
    cfg = config(server).model_dump()
    cfg["grid"]["carbon"]["zone"] = "FR"
    for src in cfg["grid"]["carbon"]["sources"][:2]:
        src["zone"] = "DE"  # the API zone is the same; the chain's zone is not
    new = build_grid(Config.model_validate(cfg), previous=old)
    assert new.carbon is not None and all(c is None for c in new.carbon.state.caches)


def test_disabled_and_re_enabled_signal(server: FixtureServer) -> None:
    Api(server)
    price = {"sources": [{"type": "static", "price_per_kwh": 0.3, "currency": "EUR"}]}
    old = build_grid(config(server, price=price))
    poll(old)
    off = build_grid(config(server, price=None), previous=old)
    assert off.price is None and off.is_disabled("price") and not off.is_disabled("carbon")
    on = build_grid(config(server, price=price), previous=off)
    assert on.price is not None and on.price.state.caches[0] is None  # nothing to carry from a disabled one


def test_stopping_the_old_grid_leaves_the_new_one_polling() -> None:
    clock = Clock(T0)
    live = ScriptedSource("api", "carbon", [(T0, T0 + 3600, 300.0)])
    old = GridSignals(carbon=SignalChain("carbon", "DE", 7200, [live], clock=clock.time))
    assert old.carbon is not None
    old.carbon.poll_due()
    new_source = ScriptedSource("api", "carbon", [(T0, T0 + 3600, 300.0)])
    new = GridSignals(carbon=SignalChain("carbon", "DE", 7200, [new_source], clock=clock.time))
    assert new.carbon is not None
    assert new.carbon.adopt_from(old.carbon) == [0]
    old.stop()
    new_source.error = SourceError("timeout", "api: slow")
    clock.advance(60)
    new.carbon.poll_due()  # due one poll interval after the carried fetch
    assert new_source.calls == 1 and live.calls == 1
    assert new.carbon.state.statuses[0].errors == {"timeout": 1}
    assert new.carbon.state.value_at(clock.time(), clock.time()) is not None
