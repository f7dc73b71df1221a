"""Restarts against the real daemon on the fake libnvidia-ml.so.1: killed, stopped, rebooted, started on a bad
state file, reloaded in a storm. What an operator relies on: the totals continue where they stopped, energy
drawn while wattson was down is counted once when the GPU's energy counter can tell it and counted as
unmetered time (never guessed) when it cannot, and no exported counter ever goes lower.

The fake GPUs draw constant power and their counter is its exact integral (tests/test_faults_nvml.py explains
the truth bounds), so over a span that includes a restart the truth is still P x (time between the reads
behind two scrapes), one from before the restart and one from after it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_c_compiler
from tests.daemon import Daemon, run_wattson
from tests.fake_libnvml import build_fake_libnvml
from tests.faults_support import (
    STATIC_CARBON,
    STATIC_GRID,
    STATIC_PRICE,
    GridApi,
    Metrics,
    SampleKey,
    Scraper,
    scrape,
    wait_for,
)
from tests.test_faults_nvml import POWER_W, FakeDriver, all_up, energy, truth_bounds, up

pytestmark = [pytest.mark.fault, pytest.mark.integration]

INTERVAL = 0.2
GPU_TIMEOUT = 0.5
KILL_DOWNTIME_SECONDS = 20.0
J_PER_KWH = 3.6e6
# Counters that describe one process, not the meter: they start at 0 in every process by design.
PER_PROCESS_COUNTERS = ("process_", "wattson_storage_errors_total")


def config(boot_id_file: Path, grid: str = STATIC_GRID) -> str:
    return f"""
gpu:
  backend: nvml
  nvml: {{init_retry_initial_seconds: 0.2, init_retry_max_seconds: 1.0, boot_id_file: "{boot_id_file}"}}
sampler: {{interval_seconds: {INTERVAL}, gpu_timeout_seconds: {GPU_TIMEOUT}}}
grid:{grid}
"""


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory) -> Path:
    require_c_compiler()
    return build_fake_libnvml(tmp_path_factory.mktemp("fake-libnvml"))


@dataclass
class Host:
    """One GPU host across restarts: its fake driver, its boot id, wattson's storage directory."""

    tmp: Path
    driver: FakeDriver
    boot_id_file: Path
    storage: Path

    @property
    def state_file(self) -> Path:
        return self.storage / "state.json"

    def saved(self) -> dict[str, dict[str, object]]:
        """The GPUs of the state file as the last run left it, by UUID."""
        return json.loads(self.state_file.read_text())["gpus"]

    def reboot(self) -> None:
        """A new boot id, and every energy counter starting again from 0 (the driver loads again)."""
        self.boot_id_file.write_text(f"boot-{time.time_ns()}\n")
        self.driver.set(**{f"gpu__{g}__energy_origin": time.time() for g in POWER_W})

    @contextmanager
    def run(self, grid: str = STATIC_GRID) -> Iterator[tuple[Daemon, Scraper]]:
        """wattson on this host's storage, scraped every 0.15 s, once every GPU is up and counting."""
        with run_wattson(self.tmp, config(self.boot_id_file, grid), env=self.driver.env(),
                         storage=self.storage) as d, Scraper(d.base, 0.15) as scraper:
            wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
            yield d, scraper


@pytest.fixture
def host(fake_lib, tmp_path) -> Host:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("boot-1\n")
    return Host(tmp_path, FakeDriver(fake_lib, tmp_path / "nvml.control"), boot_id, tmp_path / "data")


def uuids(m: Metrics) -> dict[int, str]:
    return {int(d["gpu"]): d["uuid"] for d, _ in m.find("wattson_gpu_info")}


def persistent_counters(m: Metrics) -> dict[SampleKey, float]:
    return {k: v for k, v in m.counters().items() if not k[0].startswith(PER_PROCESS_COUNTERS)}


def lower_than_before(before: list[Metrics], after: list[Metrics], missing_ok: bool = False) -> list[str]:
    """Every counter sample of a later run that is lower than (or, unless `missing_ok`, missing from) its highest
    value in an earlier run: what Prometheus would read as a counter reset."""
    highest: dict[SampleKey, float] = {}
    for m in before:
        for key, value in persistent_counters(m).items():
            highest[key] = max(value, highest.get(key, value))
    out = []
    for i, m in enumerate(after):
        now = persistent_counters(m)
        for key, top in highest.items():
            value = now.get(key)
            if (value is None and not missing_ok) or (value is not None and value < top):
                out.append(f"scrape {i} after the restart: {key[0]}{dict(key[1])} = {value!r}, before {top!r}")
    return out


def unmetered(m: Metrics, gpu: int) -> float:
    return m.must("wattson_gpu_unmetered_seconds_total", gpu=str(gpu))


def assert_priced_exactly(m: Metrics) -> None:
    """With static sources from the first joule, every total is energy x price and energy x intensity."""
    for gpu in POWER_W:
        e = energy(m, gpu)
        assert m.must("wattson_gpu_cost_total", gpu=str(gpu), currency="EUR") == \
            pytest.approx(e / J_PER_KWH * STATIC_PRICE, rel=1e-9), f"GPU {gpu} cost"
        assert m.must("wattson_gpu_co2e_grams_total", gpu=str(gpu)) == \
            pytest.approx(e / J_PER_KWH * STATIC_CARBON, rel=1e-9), f"GPU {gpu} CO2e"
        assert sum(v for _, v in m.find("wattson_gpu_unpriced_energy_joules_total", gpu=str(gpu))) == 0


def stop_after_last_scrape(d: Daemon, scraper: Scraper, sig: signal.Signals) -> Metrics:
    """Stop scraping, scrape once more, send `sig` and wait for the exit: the last scrape is the newest
    state an observer saw before the process went away."""
    scraper.stop()
    scraper.assert_healthy()
    last = scrape(d.base)
    scraper.history.append(last)
    os.kill(d.proc.pid, sig)
    d.proc.wait(10)
    return last


@pytest.mark.parametrize("sig, downtime", [(signal.SIGKILL, KILL_DOWNTIME_SECONDS), (signal.SIGTERM, 3.0)],
                         ids=["sigkill-20s", "sigterm-3s"])
def test_restart_continues_every_total_and_counts_the_downtime_once(host, sig, downtime):
    """Killed (state up to 5 s old) or stopped (state saved at exit), then started on the same storage: over
    the whole span energy is the truth, cost and CO2e follow it exactly, nothing is lower, nothing unmetered."""
    with host.run() as (d, scraper):
        start = scraper.latest()
        if sig == signal.SIGKILL:
            # Kill late in a save interval, so seconds of counting exist only in memory and must come back
            # from the energy counter.
            saved_at = wait_for("a first save", lambda: scraper.latest().value(
                "wattson_storage_last_save_timestamp_seconds"), timeout=10)
            time.sleep(max(0.0, saved_at + 3.5 - time.time()))
        else:
            time.sleep(1.0)
        before = stop_after_last_scrape(d, scraper, sig)
    run1 = scraper.history
    saved = host.saved()
    ids = uuids(before)
    for gpu, watts in POWER_W.items():
        missing = energy(before, gpu) - float(saved[ids[gpu]]["energy_joules"])  # type: ignore[arg-type]
        if sig == signal.SIGKILL:
            assert missing > 2.5 * watts, f"GPU {gpu}: only {missing:.0f} J unsaved; the kill proves nothing"
        else:
            assert missing <= 0, f"GPU {gpu}: {missing:.1f} J counted but not saved at SIGTERM"
    time.sleep(downtime)

    with host.run() as (d2, scraper2):
        time.sleep(1.0)
        after = scraper2.latest()
    scraper2.assert_healthy()
    run2 = scraper2.history
    lower = lower_than_before(run1, run2)
    assert not lower, lower[:5]
    for gpu, watts in POWER_W.items():
        low, high = truth_bounds(before, after, watts)
        got = energy(after, gpu) - energy(before, gpu)
        assert low <= got <= high, f"GPU {gpu}: exported {got:.3f} J over the restart, truth {low:.3f}..{high:.3f}"
        low, high = truth_bounds(start, after, watts)
        assert low <= energy(after, gpu) - energy(start, gpu) <= high
    for m in run1 + run2:
        assert all(unmetered(m, g) == 0 for g in POWER_W), "no time may be unmetered when the counter ran on"
    assert_priced_exactly(after)
    log = d2.log()
    assert "state restored" in log and "level=warn" not in log, log[-2000:]
    ratios = {g: (energy(after, g) - energy(before, g)) / (sum(truth_bounds(before, after, w)) / 2)
              for g, w in POWER_W.items()}
    print(f"{sig.name}, {downtime:.0f} s down: exported/truth over the span {ratios}")


@pytest.mark.parametrize("event", ["reboot", "driver-upgrade", "driver-reload"])
def test_downtime_across_a_new_counter_epoch_is_unmetered(host, event):
    """While wattson was stopped the host rebooted (new boot id, counters from 0), the driver was upgraded (new
    version; the fake counter even runs on, plausibly), or reloaded (same version, counters from 0): the energy
    of the downtime cannot be known, so it is counted as unmetered seconds; nothing is invented, nothing lost."""
    with host.run() as (d, scraper):
        start = scraper.latest()
        time.sleep(1.0)
        before = stop_after_last_scrape(d, scraper, signal.SIGTERM)
    saved = host.saved()
    ids = uuids(before)
    if event == "reboot":
        host.reboot()
    elif event == "driver-upgrade":
        host.driver.set(driver_version="570.86.15")
    else:
        host.driver.set(**{f"gpu__{g}__energy_origin": time.time() for g in POWER_W})
    time.sleep(2.0)
    restarted = time.time()
    with host.run() as (d2, scraper2):
        first = scraper2.history[0]
        time.sleep(1.0)
        after = scraper2.latest()
    scraper2.assert_healthy()
    lower = lower_than_before(scraper.history, scraper2.history)
    assert not lower, lower[:5]
    for gpu, watts in POWER_W.items():
        gap = unmetered(after, gpu)
        reading_time = float(saved[ids[gpu]]["reading_time"])  # type: ignore[arg-type]
        # The unmetered time runs from the last saved reading to the first new one, which came after the
        # restart and no later than the round behind the first scrape.
        first_round = first.must("wattson_last_sample_timestamp_seconds")
        low_gap, high_gap = restarted - reading_time, first_round - reading_time + 0.01
        assert low_gap <= gap <= high_gap, f"GPU {gpu}: {gap:.3f} s unmetered, expected {low_gap:.3f}..{high_gap:.3f}"
        assert all(unmetered(m, gpu) == gap for m in scraper2.history), "unmetered time must be counted once"
        low, high = truth_bounds(before, after, watts)
        got = energy(after, gpu) - energy(before, gpu)
        assert low - watts * gap <= got <= high - watts * gap, \
            f"GPU {gpu}: {got:.1f} J; the metered time holds {low - watts * gap:.1f}..{high - watts * gap:.1f} J"
        assert energy(after, gpu) > energy(start, gpu)
        print(f"{event}: GPU {gpu} {gap:.2f} s unmetered, {restarted - reading_time:.2f} s down before the restart")
    assert_priced_exactly(after)
    assert "time not metered" in d2.log()


def test_a_gpu_without_energy_counter_counts_the_downtime_as_unmetered(host):
    """GPU 1 has no energy counter (pre-Volta): power is not sampled while wattson is stopped, so its downtime is
    unmetered, while GPUs 0 and 2 recover theirs from the counter."""
    host.driver.set(gpu__1__energy="unsupported")
    with host.run() as (d, scraper):
        time.sleep(1.0)
        before = stop_after_last_scrape(d, scraper, signal.SIGTERM)
    reading_time = float(host.saved()[uuids(before)[1]]["reading_time"])  # type: ignore[arg-type]
    time.sleep(2.0)
    restarted = time.time()
    with host.run() as (d2, scraper2):
        first = scraper2.history[0]
        time.sleep(1.0)
        after = scraper2.latest()
    scraper2.assert_healthy()
    lower = lower_than_before(scraper.history, scraper2.history)
    assert not lower, lower[:5]
    gap = unmetered(after, 1)
    low_gap, high_gap = restarted - reading_time, first.must("wattson_last_sample_timestamp_seconds") - reading_time
    assert low_gap <= gap <= high_gap + 0.01, f"{gap:.3f} s unmetered, expected {low_gap:.3f}..{high_gap:.3f}"
    assert unmetered(after, 0) == unmetered(after, 2) == 0
    for gpu in (0, 2):
        low, high = truth_bounds(before, after, POWER_W[gpu])
        assert low <= energy(after, gpu) - energy(before, gpu) <= high
    low, high = truth_bounds(before, after, POWER_W[1])
    got = energy(after, 1) - energy(before, 1)
    assert low - POWER_W[1] * gap <= got <= high - POWER_W[1] * gap, \
        f"GPU 1: {got:.1f} J; the metered time holds {low - POWER_W[1] * gap:.1f}..{high - POWER_W[1] * gap:.1f} J"
    print(f"no energy counter: {gap:.2f} s unmetered for {restarted - reading_time:.2f} s down before the restart")


def _foreign_state() -> str:
    gpu = {"energy_joules": 9.0e9, "method": "counter", "cost": {"EUR": 750.0}, "credit": {}, "co2e_grams": 1.1e6,
           "unpriced_joules": {}, "unmetered_seconds": 0.0, "errors": {}, "counter_epoch": "boot-1 driver=550.54.15",
           "counter_millijoules": 1, "reading_time": time.time() - 60}
    return json.dumps({"format": "wattson-state", "version": 1, "written_at": time.time() - 60, "host": "elsewhere",
                       "gpus": {f"GPU-0000000{i}-0ther-4000-8000-00000000000{i}": gpu for i in range(3)},
                       "workloads": {}, "grid": {}})


@pytest.mark.parametrize("reason", ["corrupt", "foreign"])
def test_an_unusable_state_file_is_set_aside_and_counting_starts_from_zero(host, reason):
    """Garbage bytes, or a valid file of another host's GPUs: wattson starts anyway, from zero, sets the file
    aside under a name that says why, counts it once and says it once."""
    content = bytes(range(256)) * 8 if reason == "corrupt" else _foreign_state().encode()
    host.storage.mkdir()
    host.state_file.write_bytes(content)
    started = time.time()
    with host.run() as (d, scraper):
        time.sleep(0.8)
        m = scraper.latest()
        up_for = m.must("wattson_last_sample_timestamp_seconds") - started
        for gpu, watts in POWER_W.items():
            assert 0 < energy(m, gpu) <= watts * up_for, f"GPU {gpu}: {energy(m, gpu)} J is not counted from zero"
        assert m.must("wattson_storage_errors_total", operation="load", reason=reason) == 1
        assert sum(v for _, v in m.find("wattson_storage_errors_total")) == 1
    scraper.assert_healthy()
    aside = [p for p in host.storage.iterdir() if p.name.startswith(f"state.json.{reason}-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content, list(host.storage.iterdir())
    warnings = [ln for ln in d.log().splitlines() if "level=warn" in ln]
    assert len(warnings) == 1 and "state file not used" in warnings[0] and aside[0].name in warnings[0], warnings
    assert set(host.saved()) == set(uuids(m).values()), "the exit must save a fresh state of this host's GPUs"


def em_grid(api: GridApi) -> str:
    """Carbon from the local Electricity Maps stand-in, whose data stays valid for 10 minutes, then static."""
    return f"""
  carbon:
    zone: DE
    max_age_seconds: 600
    sources:
      - {{type: electricitymaps, base_url: "{api.base_url}", api_key_env: WATTSON_TEST_EM_KEY, use_forecast: false,
          timeout_seconds: 0.5, poll_interval_seconds: 1}}
      - {{type: static, grams_per_kwh: {STATIC_CARBON}}}
  price: {{zone: DE, sources: [{{type: static, price_per_kwh: {STATIC_PRICE}, currency: EUR}}]}}
"""


def polls(api: GridApi, since: float) -> list[float]:
    """Arrival times of the Electricity Maps polls since `since` (requests within 0.1 s are one poll)."""
    out: list[float] = []
    for t in sorted(h.received for h in api.hits_of("electricitymaps") if h.received >= since):
        if not out or t - out[-1] > 0.1:
            out.append(t)
    return out


def test_reload_storm_while_a_source_is_down_keeps_its_cache_counters_and_schedule(host):
    """20 SIGHUPs within a second, same config, while the carbon API answers 500 but its last data is still
    valid: carbon stays known, its error counts never drop, the API is not polled faster than its backoff
    allows, and the reloads coalesce (one at a time, fewer than the signals)."""
    with GridApi() as api:
        grid = em_grid(api)
        with run_wattson(host.tmp, config(host.boot_id_file, grid),
                         env={**host.driver.env(), "WATTSON_TEST_EM_KEY": "storm-key"}, storage=host.storage) as d, \
                Scraper(d.base, 0.1) as scraper:
            wait_for("carbon from the API", lambda: scraper.when(
                lambda m: m.signal_source("carbon") == "electricitymaps"), timeout=10)
            api.set("http_500", "electricitymaps")
            wait_for("the API failing", lambda: scraper.when(
                lambda m: m.source_errors("electricitymaps").get("http_5xx", 0) >= 2), timeout=10)
            quiet_since = time.time()
            time.sleep(2.0)
            regular = polls(api, quiet_since)
            storm_start = time.time()
            storm_from = scraper.latest()
            # One burst: a reload of this config takes about 5 ms, so signals spaced wider than that each run
            # their own reload, in turn; these arrive while one is pending or running and fold into it.
            for _ in range(20):
                os.kill(d.proc.pid, signal.SIGHUP)
            wait_for("a reload", lambda: "config reloaded" in d.log(), timeout=5)
            time.sleep(2.5)
            storm = polls(api, storm_start)
            storm_seconds = time.time() - storm_start
            reloads = d.log().count("config reloaded")
            assert d.proc.poll() is None
        scraper.assert_healthy()
    during = scraper.since(storm_from)
    for m in during:
        assert m.signal_source("carbon") == "electricitymaps", "carbon must stay on the API's still-valid data"
        assert sum(v for _, v in m.find("wattson_gpu_unpriced_energy_joules_total")) == 0
    assert during[-1].source_errors("electricitymaps")["http_5xx"] >= storm_from.source_errors(
        "electricitymaps")["http_5xx"]
    # The failing source backs off 0.5-1 s between polls; a reload that forgot the schedule would poll at once.
    gaps = [b - a for a, b in zip(storm, storm[1:], strict=False)]
    assert all(g >= 0.45 for g in gaps), f"polls {gaps} s apart during the storm (regular: {regular})"
    assert len(storm) <= storm_seconds / 0.5 + 1, f"{len(storm)} polls in the storm"
    assert 1 <= reloads < 20, f"{reloads} 'config reloaded' lines for 20 SIGHUPs"
    assert "config reload rejected" not in d.log()


def test_a_gpu_whose_first_reads_fail_after_a_kill_never_exports_lower_totals(host):
    """Killed with seconds of counting unsaved, started while GPU 1's reads fail: GPU 1 must not be exported
    below what was exported before the kill (Prometheus would read a reset and count its whole total again);
    once it reads, the counter covers the whole gap."""
    with host.run() as (d, scraper):
        saved_at = wait_for("a first save", lambda: scraper.latest().value(
            "wattson_storage_last_save_timestamp_seconds"), timeout=10)
        time.sleep(max(0.0, saved_at + 2.0 - time.time()))
        before = stop_after_last_scrape(d, scraper, signal.SIGKILL)
    host.driver.set(gpu__1__error__nvmlDeviceGetPowerUsage="unknown")
    with run_wattson(host.tmp, config(host.boot_id_file), env=host.driver.env(), storage=host.storage) as d2, \
            Scraper(d2.base, 0.1) as scraper2:
        time.sleep(1.0)
        assert not up(scraper2.latest(), 1)
        host.driver.set(gpu__1__error__nvmlDeviceGetPowerUsage=None)
        wait_for("all GPUs up", lambda: all_up(scraper2), timeout=5)
        time.sleep(0.5)
        after = scraper2.latest()
    low, high = truth_bounds(before, after, POWER_W[1])
    assert low <= energy(after, 1) - energy(before, 1) <= high
    # While its reads fail, GPU 1's counters are absent (a gap to Prometheus), never lower; once it reads
    # they are all back.
    lower = lower_than_before(scraper.history, scraper2.history, missing_ok=True)
    assert not lower, lower[:3]
    assert not lower_than_before(scraper.history, [after]), "counters still missing once GPU 1 reads"


def test_a_gpu_lost_at_start_continues_its_totals_when_it_comes_back(host):
    """GPU 1 is off the bus when wattson starts, and is back after a driver reload: it must continue its saved
    totals (same boot and driver, so its counter covers the whole gap), not start again from zero."""
    with host.run() as (d, scraper):
        time.sleep(1.0)
        before = stop_after_last_scrape(d, scraper, signal.SIGTERM)
    host.driver.set(gpu__1__error="gpu_lost")
    with run_wattson(host.tmp, config(host.boot_id_file), env=host.driver.env(), storage=host.storage) as d2, \
            Scraper(d2.base, 0.15) as scraper2:
        wait_for("GPUs 0 and 2 up", lambda: scraper2.when(lambda m: up(m, 0) and up(m, 2)), timeout=10)
        host.driver.set(gpu__1__error=None, driver="gone")
        wait_for("every GPU down", lambda: scraper2.when(lambda m: not up(m, 0)), timeout=5)
        host.driver.set(driver=None)
        wait_for("all GPUs up", lambda: all_up(scraper2), timeout=10)
        time.sleep(0.5)
        after = scraper2.latest()
    lower = lower_than_before(scraper.history, scraper2.history, missing_ok=True)
    assert not lower, lower[:3]
    low, high = truth_bounds(before, after, POWER_W[1])
    assert low <= energy(after, 1) - energy(before, 1) <= high
