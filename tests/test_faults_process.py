"""Process faults: SIGTERM ends the daemon cleanly and quickly, even with stalled dependencies; SIGHUP
reloads the config, and a config that does not validate is rejected while the old one keeps running."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_c_compiler
from tests.daemon import Daemon, run_wattson
from tests.fake_libnvml import build_fake_libnvml, fake_nvml_env, write_control
from tests.faults_support import (
    STATIC_GRID,
    GridApi,
    Metrics,
    Scraper,
    grid_config,
    simulated_config,
    wait_for,
)

pytestmark = [pytest.mark.fault, pytest.mark.integration]

EXIT_BOUND_SECONDS = 2.0


def _terminate(d: Daemon) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds until the process was gone)."""
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wattson still running 10 s after SIGTERM: {d.log()[-2000:]}")
    return rc, time.monotonic() - t0


def test_sigterm_exits_cleanly_under_scrapes(tmp_path):
    with run_wattson(tmp_path, simulated_config(STATIC_GRID, gpus=4)) as d, \
            Scraper(d.base, period_seconds=0.02, parse=False) as scraper:
        time.sleep(1.0)
        rc, seconds = _terminate(d)
    print(f"SIGTERM under scrapes: exit {rc} after {seconds:.2f}s")
    assert rc == 0, d.log()[-2000:]
    assert seconds < EXIT_BOUND_SECONDS, f"exit took {seconds:.2f}s"
    assert "shutting down" in d.log() and "Traceback" not in d.log()
    assert len(scraper.latencies) > 10


def test_sigterm_exits_quickly_with_hung_gpu_and_hanging_api(tmp_path):
    """A GPU whose NVML calls hang and grid APIs that never answer must not delay the exit past 2 s."""
    require_c_compiler()
    lib = build_fake_libnvml(tmp_path / "lib")
    control = tmp_path / "nvml.control"
    write_control(control, {"gpus": 2})
    config = """
gpu: {backend: nvml}
sampler: {interval_seconds: 0.2, gpu_timeout_seconds: 5}
grid:{}
"""
    with GridApi(hang_seconds=30) as api:
        config = config.replace("{}", grid_config(api, timeout_seconds=20, max_age_seconds=60))
        env = fake_nvml_env(lib, control, base={"WATTSON_TEST_EM_KEY": "k"})
        with run_wattson(tmp_path, config, env=env) as d:
            time.sleep(0.5)
            api.set("hang")
            write_control(control, {"gpus": 2, "gpu.1.hang_ms": 60_000})
            # Wait until both chains are inside a fetch and a sampling round is waiting for GPU 1.
            wait_for("both chains stuck in a fetch", lambda: sum(
                1 for h in api.hits if h.mode == "hang" and h.answered is None) >= 2, timeout=10)
            time.sleep(0.5)
            rc, seconds = _terminate(d)
    assert rc == 0, d.log()[-2000:]
    assert seconds < EXIT_BOUND_SECONDS, f"exit took {seconds:.2f}s"


def test_sigterm_exits_quickly_with_silent_connections(tmp_path):
    """300 connections that never send a byte must not hold up the exit."""
    with run_wattson(tmp_path, simulated_config(STATIC_GRID, gpus=2)) as d:
        idle = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(300)]
        try:
            time.sleep(0.3)
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(EXIT_BOUND_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {EXIT_BOUND_SECONDS}s after SIGTERM")
        finally:
            for s in idle:
                s.close()
    assert rc == 0


def _config_path(d: Daemon) -> Path:
    args = [str(a) for a in d.proc.args]  # type: ignore[union-attr]
    return Path(args[args.index("--config.file") + 1])


def _price_grid(price: float, carbon: float = 380.0) -> str:
    return f"""
  carbon: {{zone: DE, sources: [{{type: static, grams_per_kwh: {carbon}}}]}}
  price: {{zone: DE, sources: [{{type: static, price_per_kwh: {price}, currency: EUR}}]}}
"""


def _price(m: Metrics) -> float | None:
    return m.value("wattson_electricity_price_per_kwh", zone="DE", currency="EUR")


def _cost_per_kwh(a: Metrics, b: Metrics) -> float:
    """Price actually charged between two scrapes: cost added / energy added (PUE 1)."""
    cost = sum(b.must("wattson_gpu_cost_total", gpu=g, currency="EUR") -
               a.must("wattson_gpu_cost_total", gpu=g, currency="EUR") for g in ("0", "1"))
    joules = sum(b.must("wattson_gpu_energy_joules_total", gpu=g) -
                 a.must("wattson_gpu_energy_joules_total", gpu=g) for g in ("0", "1"))
    return cost / (joules / 3.6e6)


def test_sighup_reloads_and_rejects_invalid_config(tmp_path):
    with run_wattson(tmp_path, simulated_config(_price_grid(0.30))) as d, \
            Scraper(d.base, period_seconds=0.1) as scraper:
        path = _config_path(d)
        wait_for("price 0.30", lambda: scraper.when(lambda m: _price(m) == 0.30), timeout=5)

        # A valid change applies live.
        path.write_text(simulated_config(_price_grid(0.45, carbon=120.0)))
        d.proc.send_signal(signal.SIGHUP)
        wait_for("price 0.45 after SIGHUP", lambda: scraper.when(lambda m: _price(m) == 0.45), timeout=5)
        time.sleep(0.5)  # let every GPU worker charge a step with the new chain
        a = scraper.latest()
        time.sleep(1.0)
        b = scraper.latest()
        assert _cost_per_kwh(a, b) == pytest.approx(0.45, rel=1e-6), "new energy must be charged at 0.45"
        assert b.must("wattson_grid_carbon_intensity_grams_per_kwh", zone="DE") == 120.0
        assert "config reloaded" in d.log()

        # Invalid files: an unknown key, broken YAML, an empty chain. Each is rejected, the old config runs.
        invalid = {
            "unknown key": simulated_config(_price_grid(0.99)).replace("sampler:", "samplr:"),
            "broken YAML": "grid: {price: [\n",
            "empty chain": simulated_config(_price_grid(0.99)).replace(
                "sources: [{type: static, price_per_kwh: 0.99, currency: EUR}]", "sources: []"),
        }
        for what, text in invalid.items():
            before = d.log().count("config reload rejected")
            path.write_text(text)
            d.proc.send_signal(signal.SIGHUP)
            wait_for(f"rejection of the {what} logged", lambda b=before: d.log().count(
                "config reload rejected") > b, timeout=5)
            line = [ln for ln in d.log().splitlines() if "config reload rejected" in ln][-1]
            assert "level=error" in line and str(path) in line, line
            time.sleep(0.5)
            m = scraper.latest()
            assert _price(m) == 0.45, f"after the {what}: price {_price(m)}"
            assert d.proc.poll() is None

        # And the daemon still reloads a good file afterwards.
        path.write_text(simulated_config(_price_grid(0.50, carbon=120.0)))
        d.proc.send_signal(signal.SIGHUP)
        wait_for("price 0.50 after the last SIGHUP", lambda: scraper.when(lambda m: _price(m) == 0.50),
                 timeout=5)
    scraper.assert_healthy()
