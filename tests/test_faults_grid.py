"""Grid API faults against the real daemon: each chain's first source is a local API that a test
breaks while the daemon runs; the second is a static value.

For every fault: /metrics keeps answering promptly, the signal falls back to the static source
(wattson_grid_signal_info switches) and back once the API heals, the failure is counted under the
right reason, no counter ever decreases, and no energy goes unpriced (the fallback covers it).
"""

from __future__ import annotations

import time

import pytest

from tests.daemon import run_wattson
from tests.faults_support import (
    STATIC_CARBON,
    STATIC_PRICE,
    Abort,
    GridApi,
    Metrics,
    Scraper,
    grid_config,
    scrape,
    simulated_config,
    wait_for,
)

pytestmark = [pytest.mark.fault, pytest.mark.integration]

EM = "electricitymaps"
AW = "awattar"
# max_age_seconds bounds how long a failed API's last data still serves. Keep it well above the static
# fallback's re-poll (max_age / 2) plus a blocked fetch (TIMEOUT), or the fallback itself ages out.
MAX_AGE = 3.0
TIMEOUT = 0.5
KEY_ENV = {"WATTSON_TEST_EM_KEY": "test-key-not-secret"}

def _on(m: Metrics, signal: str, source: str) -> bool:
    return m.signal_source(signal) == source


def _serving(scraper: Scraper, carbon: str, price: str) -> Metrics | None:
    """The latest scrape if carbon and price are served by these sources, else None."""
    m = scraper.latest()
    return m if _on(m, "carbon", carbon) and _on(m, "price", price) else None


def _expected_value(m: Metrics, signal: str) -> float | None:
    if signal == "carbon":
        return m.value("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE")
    return m.value("wattson_electricity_price_per_kwh", zone="DE", currency="EUR")


def _nonzero(counts: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in counts.items() if v}


def _unpriced(m: Metrics, signal: str) -> float:
    return sum(v for _, v in m.find("wattson_gpu_unpriced_energy_joules_total", signal=signal))


# (API mode, expected reason) per API; None leaves that API healthy through the test.
CASES = [
    pytest.param((("http_500", "http_5xx"), ("http_500", "http_5xx")), id="http-500"),
    pytest.param((("hang", "timeout"), ("hang", "timeout")), id="timeout"),
    pytest.param((("refused", "connection"), ("refused", "connection")), id="connection-refused"),
    pytest.param((("reset", "connection"), ("reset", "connection")), id="connection-reset"),
    pytest.param((("cut", "connection"), ("cut", "connection")), id="body-cut-mid-stream"),
    pytest.param((("truncated_json", "malformed"), ("truncated_json", "malformed")), id="truncated-json"),
    pytest.param((("malformed", "malformed"), ("malformed", "malformed")), id="html-instead-of-json"),
    pytest.param((("wrong_zone", "wrong_zone"), ("wrong_zone", "wrong_zone")), id="wrong-zone"),
    pytest.param((None, ("wrong_units", "invalid_value")), id="wrong-units"),
    pytest.param((("absurd", "invalid_value"), ("absurd", "invalid_value")), id="absurd-values"),
    pytest.param((("empty", "no_data"), ("empty", "no_data")), id="empty-data"),
    pytest.param((("http_401", "auth"), None), id="auth-rejected"),
    pytest.param((("slowloris", "timeout"), ("slowloris", "timeout")), id="slow-loris"),
]


@pytest.mark.parametrize("faults", CASES)
def test_grid_api_fault_falls_back_and_recovers(tmp_path, faults):
    em_fault, aw_fault = faults
    faulted = {api: f for api, f in ((EM, em_fault), (AW, aw_fault)) if f is not None}
    signal_of = {EM: "carbon", AW: "price"}
    with GridApi() as api, \
            run_wattson(tmp_path, simulated_config(grid_config(api, timeout_seconds=TIMEOUT,
                                                               max_age_seconds=MAX_AGE)), env=KEY_ENV) as d, \
            Scraper(d.base, period_seconds=0.1) as scraper:
        healthy = wait_for("both signals served by the APIs", lambda: _serving(scraper, EM, AW), timeout=10)
        assert _expected_value(healthy, "carbon") == pytest.approx(api.carbon_grams_per_kwh)
        assert _expected_value(healthy, "price") == pytest.approx(api.price_eur_per_mwh / 1000)

        # Break the APIs.
        for name, (mode, _reason) in faulted.items():
            if mode == "refused":
                api.refuse()
            else:
                api.set(mode, name)
        fallback_value = {"carbon": STATIC_CARBON, "price": STATIC_PRICE}

        def fell_back() -> Metrics | None:
            m = scraper.latest()
            for sig in ("carbon", "price"):
                if m.signal_source(sig) is None:
                    counted = [_nonzero(m.source_errors(name)) for name in (EM, AW)]
                    raise Abort(f"{sig} became unknown (no source serving it); errors counted: {counted}")
            for name, (_mode, reason) in faulted.items():
                sig = signal_of[name]
                if not _on(m, sig, "static") or m.source_errors(name).get(reason, 0) < 1:
                    return None
                if m.value("wattson_source_up", source=name) != 0:
                    return None
            return m

        broken = wait_for(f"fallback to static and errors counted ({faulted})", fell_back,
                          timeout=MAX_AGE + 4 * TIMEOUT + 4)
        for name in faulted:
            sig = signal_of[name]
            assert _expected_value(broken, sig) == pytest.approx(fallback_value[sig])
            new_errors = {r: n - healthy.source_errors(name).get(r, 0)
                          for r, n in broken.source_errors(name).items()}
            assert {r for r, n in new_errors.items() if n > 0} == {faulted[name][1]}, new_errors
        for name in {EM, AW} - set(faulted):  # the other API keeps serving its signal
            assert _on(broken, signal_of[name], name)
            assert sum(broken.source_errors(name).values()) == 0
        # Repeated failures back off (within poll_interval_seconds) but keep being counted.
        assert all(broken.source_errors(name)[reason] >= 2 for name, (_m, reason) in faulted.items())

        # Heal.
        api.reopen()
        for name in faulted:
            api.set("ok", name)
        healed = wait_for("the APIs serving again", lambda: _serving(scraper, EM, AW), timeout=MAX_AGE + 6)
        assert _expected_value(healed, "carbon") == pytest.approx(api.carbon_grams_per_kwh)

    scraper.assert_healthy(max_latency_seconds=1.0)
    end = scraper.latest()
    for signal in ("carbon", "price"):
        # The fallback covered every joule: nothing was counted as unpriced from the healthy start on.
        assert _unpriced(end, signal) == pytest.approx(_unpriced(healthy, signal), abs=1e-9), signal
    co2e = "wattson_gpu_co2e_grams_total"
    assert end.must(co2e, gpu="0") > healthy.must(co2e, gpu="0")


def test_rate_limited_waits_for_retry_after(tmp_path):
    """429 with Retry-After: no request reaches the API before Retry-After has passed."""
    with GridApi(retry_after="3") as api, \
            run_wattson(tmp_path, simulated_config(grid_config(api, timeout_seconds=TIMEOUT,
                                                               max_age_seconds=MAX_AGE)), env=KEY_ENV) as d, \
            Scraper(d.base) as scraper:
        wait_for("carbon from the API", lambda: _on(scraper.latest(), "carbon", EM), timeout=10)
        api.set("rate_limited", EM, AW)
        wait_for("two rate-limited answers per API",
                 lambda: all(sum(h.mode == "rate_limited" for h in api.hits_of(a)) >= 2 for a in (EM, AW)),
                 timeout=12)
        m = wait_for("fallback to static", lambda: _serving(scraper, "static", "static"), timeout=MAX_AGE + 3)
        assert m.source_errors(EM)["rate_limited"] >= 1 and m.source_errors(AW)["rate_limited"] >= 1
        api.set("ok", EM, AW)
        wait_for("back on the APIs", lambda: _serving(scraper, EM, AW), timeout=6)
    scraper.assert_healthy()
    for name in (EM, AW):
        hits = api.hits_of(name)
        for prev, nxt in zip(hits, hits[1:], strict=False):
            if prev.mode == "rate_limited":
                gap = nxt.received - prev.received
                # The daemon stamps its poll just before sending; 0.1 s covers that and the clock reading.
                assert gap >= 3.0 - 0.1, f"{name}: request {gap:.2f}s after a 429 with Retry-After: 3"


def test_rate_limited_http_date_retry_after(tmp_path):
    """Retry-After as an HTTP date is honoured like delta-seconds."""
    from email.utils import formatdate

    api = GridApi()
    with api, run_wattson(tmp_path, simulated_config(grid_config(api, timeout_seconds=TIMEOUT,
                                                                 max_age_seconds=MAX_AGE)), env=KEY_ENV) as d:
        wait_for("carbon from the API", lambda: _on(scrape(d.base), "carbon", EM), timeout=10)
        until = time.time() + 4
        api.retry_after = formatdate(until, usegmt=True)
        api.set("rate_limited", EM)
        wait_for("a rate-limited answer", lambda: any(h.mode == "rate_limited" for h in api.hits_of(EM)),
                 timeout=5)
        api.set("ok", EM)
        first_429 = next(h for h in api.hits_of(EM) if h.mode == "rate_limited")
        wait_for("a request after the 429", lambda: api.hits_of(EM)[-1].received > first_429.received
                 and api.hits_of(EM)[-1].mode == "ok", timeout=8)
        after = [h for h in api.hits_of(EM) if h.received > first_429.received]
        # HTTP dates have whole seconds: the deadline is `until` rounded down.
        assert after[0].received >= int(until) - 0.1, f"{after[0].received - first_429.received:.2f}s after"
