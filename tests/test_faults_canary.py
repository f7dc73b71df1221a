"""Security: an API key must never leave the daemon, even when the API echoes it back.

The daemon runs at debug log level with canary keys in its environment for two sources that send
them differently: Electricity Maps (`auth-token` header) and ENTSO-E (`securityToken` query
parameter). The local API answers every request with an error that repeats the key it received,
in every place an error can surface: a 401 or 500 body, the URL echoed back, a field value the
source quotes in its message (zone, carbonIntensity), an ENTSO-E acknowledgement text. The log,
/metrics, the landing page, /healthz and /readyz must not contain the key.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.daemon import Daemon, get, run_wattson
from tests.faults_support import GridApi, Scraper, simulated_config, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.integration]

EM_ENV, ENTSOE_ENV = "WATTSON_CANARY_EM_KEY", "WATTSON_CANARY_ENTSOE_KEY"


def _config(api: GridApi) -> str:
    return simulated_config(f"""
  carbon:
    zone: DE
    max_age_seconds: 2
    sources:
      - {{type: electricitymaps, base_url: "{api.base_url}", api_key_env: {EM_ENV}, use_forecast: false,
          timeout_seconds: 1, poll_interval_seconds: 1}}
      - {{type: static, grams_per_kwh: 300}}
  price:
    zone: DE
    max_age_seconds: 2
    sources:
      - {{type: entsoe, base_url: "{api.base_url}", api_key_env: {ENTSOE_ENV}, timeout_seconds: 1,
          poll_interval_seconds: 1}}
      - {{type: static, price_per_kwh: 0.3, currency: EUR}}
""")


def _exposed(keys: list[str], d: Daemon, min_fragment: int) -> list[str]:
    """Where any fragment of `min_fragment` characters of any key shows up."""
    places = {"log": d.log()}
    for path in ("/metrics", "/", "/healthz", "/readyz"):
        places[path] = get(d.base + path)[2].decode(errors="replace")
    found = []
    for key in keys:
        for i in range(len(key) - min_fragment + 1):
            fragment = key[i:i + min_fragment]
            for where, text in places.items():
                if fragment in text:
                    found.append(f"{fragment!r} (key chars {i}..{i + min_fragment}) in {where}")
    return found


def _run_echo_modes(tmp_path, steps: list[dict[str, str]]) -> tuple[list[str], list[str], Daemon]:
    """Run the daemon while the APIs go through echo modes, step by step.

    Returns where whole keys and where 12-character fragments of them were found, and the daemon."""
    keys = [f"canary{uuid.uuid4().hex}", f"canary{uuid.uuid4().hex}"]
    env = {EM_ENV: keys[0], ENTSOE_ENV: keys[1]}
    with GridApi() as api, run_wattson(tmp_path, _config(api), "--log.level", "debug", env=env) as d, \
            Scraper(d.base, period_seconds=0.2) as scraper:
        for step in steps:
            before = {name: len(api.hits_of(name)) for name in step}
            for name, mode in step.items():
                api.set(mode, name)

            def asked(step: dict[str, str] = step, before: dict[str, int] = before) -> bool:
                return all(any(h.mode == mode for h in api.hits_of(name)[before[name]:])
                           for name, mode in step.items())

            wait_for(f"each API asked in its mode {step}", asked, timeout=8)
        time.sleep(0.3)
        # The echoes reached the daemon and were handled: errors were counted.
        m = scraper.latest()
        assert sum(m.source_errors("electricitymaps").values()) > 0
        assert sum(m.source_errors("entsoe").values()) > 0
        whole = _exposed(keys, d, min_fragment=len(keys[0]))
        partial = _exposed(keys, d, min_fragment=12)
    scraper.assert_healthy()
    return whole, partial, d


def test_canary_key_never_exposed(tmp_path):
    steps = [{"electricitymaps": "echo_401", "entsoe": "echo_401"},
             {"electricitymaps": "echo_500", "entsoe": "echo_500"},
             {"electricitymaps": "echo_zone", "entsoe": "echo_ack"},
             {"electricitymaps": "echo_value"}]
    whole, _partial, d = _run_echo_modes(tmp_path, steps)
    assert not whole, f"API key exposed: {whole[:5]}"
    # Proof that the keys came back in errors the daemon handled, so the absence above means something.
    assert d.log().count("<redacted>") >= 6, d.log()[-3000:]


def test_canary_key_not_exposed_in_part(tmp_path):
    """A key echoed right where error text is cut (character 160 of a body, 200 of an acknowledgement)."""
    steps = [{"electricitymaps": "echo_boundary", "entsoe": "echo_boundary"}, {"entsoe": "echo_ack_boundary"}]
    _whole, partial, _d = _run_echo_modes(tmp_path, steps)
    assert not partial, f"part of an API key exposed: {partial[:3]} ({len(partial)} fragments)"
