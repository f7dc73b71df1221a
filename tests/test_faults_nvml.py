"""NVML faults against the real daemon running on the fake libnvidia-ml.so.1 (tests/fake_libnvml).

The fake's GPUs draw constant power and its energy counter is the exact integral of that power, so
the truth is known: between two scrapes a GPU used P x (time between the reads behind them). The
reads behind a scrape happened inside the sampling round that ended at
wattson_last_sample_timestamp_seconds and lasted wattson_sampler_duration_seconds, which bounds the
exported energy from both sides. Every test checks that bound for every GPU that was up at both
ends: a GPU that lost data fails the lower bound, one counted twice fails the upper bound.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_c_compiler
from tests.daemon import run_wattson
from tests.fake_libnvml import build_fake_libnvml, fake_nvml_env, write_control
from tests.faults_support import STATIC_GRID, Metrics, Scraper, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.integration]

POWER_W = {0: 200.0, 1: 300.0, 2: 400.0}
INTERVAL = 0.2
GPU_TIMEOUT = 0.5
CONFIG = f"""
gpu:
  backend: nvml
  nvml: {{init_retry_initial_seconds: 0.2, init_retry_max_seconds: 1.0}}
sampler: {{interval_seconds: {INTERVAL}, gpu_timeout_seconds: {GPU_TIMEOUT}}}
grid:{STATIC_GRID}
"""


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory) -> Path:
    require_c_compiler()
    return build_fake_libnvml(tmp_path_factory.mktemp("fake-libnvml"))


class FakeDriver:
    """The control file of the fake library: three GPUs at known constant power, faults on demand."""

    def __init__(self, lib: Path, path: Path) -> None:
        self.path = path
        self.lib = lib
        self.settings: dict[str, object] = {"gpus": len(POWER_W)}
        origin = time.time() - 10_000
        for i, watts in POWER_W.items():
            self.settings[f"gpu.{i}.power_w"] = watts
            self.settings[f"gpu.{i}.energy_origin"] = origin
        self.write()

    def write(self) -> None:
        write_control(self.path, self.settings)

    def set(self, **changes: object) -> None:
        """gpu__1__error="gpu_lost" sets gpu.1.error; None removes a key."""
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                self.settings.pop(key, None)
            else:
                self.settings[key] = value
        self.write()

    def env(self) -> dict[str, str]:
        return fake_nvml_env(self.lib, self.path, base={})


@pytest.fixture
def driver(fake_lib, tmp_path) -> FakeDriver:
    return FakeDriver(fake_lib, tmp_path / "nvml.control")


def energy(m: Metrics, gpu: int) -> float:
    return m.must("wattson_gpu_energy_joules_total", gpu=str(gpu))


def up(m: Metrics, gpu: int) -> bool:
    return m.must("wattson_gpu_up", gpu=str(gpu)) == 1


def truth_bounds(m1: Metrics, m2: Metrics, watts: float) -> tuple[float, float]:
    """Joules a GPU at constant `watts` used between the reads behind two scrapes: (at least, at most)."""
    ts1, ts2 = (m.must("wattson_last_sample_timestamp_seconds") for m in (m1, m2))
    d1, d2 = (m.must("wattson_sampler_duration_seconds") for m in (m1, m2))
    slack = watts * 0.01 + 0.01  # clock reads around the NVML call, whole-mJ counter
    return watts * (ts2 - d2 - ts1) - slack, watts * (ts2 - ts1 + d1) + slack


def assert_energy_true(m1: Metrics, m2: Metrics, gpus: list[int] | None = None,
                       lost_seconds: float = 0.0) -> None:
    """Every GPU's exported energy between two scrapes is the truth: nothing lost (beyond `lost_seconds` of
    draw, where a counter reset makes one step uncountable), nothing counted twice."""
    for gpu in gpus if gpus is not None else list(POWER_W):
        assert up(m1, gpu) and up(m2, gpu), f"GPU {gpu} not up at both ends"
        low, high = truth_bounds(m1, m2, POWER_W[gpu])
        got = energy(m2, gpu) - energy(m1, gpu)
        low -= POWER_W[gpu] * lost_seconds
        assert low <= got <= high, f"GPU {gpu}: exported {got:.3f} J, truth {low:.3f} to {high:.3f} J"


def all_up(scraper: Scraper) -> Metrics | None:
    m = scraper.latest()
    ok = all(up(m, g) and energy(m, g) > 0 for g in POWER_W)
    return m if ok else None


def gpu_infos(m: Metrics) -> list[dict[str, str]]:
    return [d for d, _ in m.find("wattson_gpu_info")]


def test_gpu_lost_mid_run(tmp_path, driver):
    """One GPU falls off the bus and comes back: only it goes down; its gap is recovered from the counter."""
    with run_wattson(tmp_path, CONFIG, env=driver.env()) as d, Scraper(d.base, 0.15) as scraper:
        start = wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
        driver.set(gpu__1__error="gpu_lost")
        lost = wait_for("GPU 1 down with gpu_lost counted", lambda: scraper.when(
            lambda m: not up(m, 1) and m.gpu_errors(1)["gpu_lost"] >= 3), timeout=5)
        time.sleep(0.6)
        still_lost = scraper.latest()
        assert not up(still_lost, 1)
        assert energy(still_lost, 1) == energy(lost, 1), "a lost GPU's energy must not move"
        assert still_lost.value("wattson_gpu_power_watts", gpu="1") is None, "no stale power for a lost GPU"
        assert_energy_true(start, still_lost, gpus=[0, 2])
        driver.set(gpu__1__error=None)
        end = wait_for("GPU 1 back", lambda: scraper.when(
            lambda m: up(m, 1) and energy(m, 1) > energy(lost, 1)), timeout=5)
        time.sleep(0.3)
        end = scraper.latest()
    scraper.assert_healthy()
    for m in scraper.since(start):
        assert up(m, 0) and up(m, 2), "the other GPUs must stay up throughout"
        assert m.gpu_errors(0)["gpu_lost"] == 0 and m.gpu_errors(2)["gpu_lost"] == 0
    assert_energy_true(start, end)  # GPU 1 included: the gap was counted once, from the counter
    assert len(gpu_infos(end)) == 3


def test_counter_reset_and_jump(tmp_path, driver):
    """The counter drops to 0 (driver reload), later jumps by ~3.5 days of energy: each step is dropped
    and counted as counter_reset; the other GPUs are unaffected."""
    with run_wattson(tmp_path, CONFIG, env=driver.env()) as d, Scraper(d.base, 0.15) as scraper:
        start = wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
        driver.set(gpu__0__energy_origin=time.time())
        wait_for("a counter reset counted", lambda: scraper.latest().gpu_errors(0)["counter_reset"] == 1,
                 timeout=5)
        time.sleep(0.6)
        after_reset = scraper.latest()
        # One step (one sampling interval, a little more on a busy machine) is lost to the reset.
        assert_energy_true(start, after_reset, lost_seconds=INTERVAL + 0.3)
        driver.set(gpu__0__energy_origin=time.time() - 1_500_000)  # 300 MJ appear at once
        wait_for("a counter jump counted", lambda: scraper.latest().gpu_errors(0)["counter_reset"] == 2,
                 timeout=5)
        time.sleep(0.6)
        end = scraper.latest()
    scraper.assert_healthy()
    assert_energy_true(start, end, lost_seconds=2 * (INTERVAL + 0.3))
    assert end.gpu_errors(1)["counter_reset"] == 0 and end.gpu_errors(2)["counter_reset"] == 0
    assert_energy_true(start, end, gpus=[1, 2])


def test_energy_counter_unsupported(tmp_path, driver):
    """A GPU without the counter is integrated from power; one whose counter stops answering NOT_SUPPORTED
    mid-run switches to integration without a jump or a gap."""
    driver.set(gpu__1__energy="unsupported")
    with run_wattson(tmp_path, CONFIG, env=driver.env()) as d, Scraper(d.base, 0.15) as scraper:
        start = wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
        methods = {i["gpu"]: i["energy_method"] for i in gpu_infos(start)}
        assert methods == {"0": "counter", "1": "integrated", "2": "counter"}
        driver.set(gpu__2__error__nvmlDeviceGetTotalEnergyConsumption="not_supported")
        end = wait_for("GPU 2 integrating", lambda: scraper.when(lambda m: any(
            i["gpu"] == "2" and i["energy_method"] == "integrated" for i in gpu_infos(m))), timeout=5)
        time.sleep(0.6)
        end = scraper.latest()
    scraper.assert_healthy()
    for m in scraper.since(start):
        assert all(up(m, g) for g in POWER_W), "an unsupported counter is not a failed read"
    assert_energy_true(start, end)
    assert len(gpu_infos(end)) == 3
    assert end.gpu_errors(2)["not_supported"] == 0


def test_hung_driver_call(tmp_path, driver):
    """Every NVML call on GPU 1 sleeps 2 s: GPU 1 is marked down (hung, counted once per hang) while the
    sampler keeps its pace for the others; after the hang, GPU 1's counter covers the gap exactly."""
    with run_wattson(tmp_path, CONFIG, env=driver.env()) as d, Scraper(d.base, 0.15) as scraper:
        start = wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
        driver.set(gpu__1__hang_ms=2000)
        hung = wait_for("GPU 1 down as hung", lambda: scraper.when(
            lambda m: not up(m, 1) and m.gpu_errors(1)["hung"] >= 1), timeout=5)
        time.sleep(1.5)
        during = scraper.latest()
        assert not up(during, 1)
        # The sampler kept going: ~1.5 s / 0.2 s rounds happened, none waiting for the hung GPU.
        ts = [m.must("wattson_last_sample_timestamp_seconds") for m in scraper.since(hung)]
        gaps = [b - a for a, b in zip(ts, ts[1:], strict=False) if b != a]
        assert gaps and max(gaps) < INTERVAL + GPU_TIMEOUT + 0.3, f"sampling stalled: gaps {gaps}"
        assert during.must("wattson_sampler_duration_seconds") < GPU_TIMEOUT + 0.2
        assert_energy_true(start, during, gpus=[0, 2])
        driver.set(gpu__1__hang_ms=None)
        wait_for("GPU 1 back", lambda: up(scraper.latest(), 1), timeout=6)
        time.sleep(0.4)
        end = scraper.latest()
    scraper.assert_healthy()
    for m in scraper.since(start):
        assert up(m, 0) and up(m, 2), "the other GPUs must stay up throughout"
    assert_energy_true(start, end)


def test_driver_gone_and_back(tmp_path, driver):
    """The driver is unloaded for ~2 s: every GPU goes down, NVML is re-initialised with backoff when it
    returns, the GPUs are matched by UUID (no new series), and the counter covers the outage once."""
    with run_wattson(tmp_path, CONFIG, env=driver.env()) as d, Scraper(d.base, 0.15) as scraper:
        start = wait_for("all GPUs up and counting", lambda: all_up(scraper), timeout=10)
        driver.set(driver="gone")
        down = wait_for("every GPU down", lambda: scraper.when(
            lambda m: not any(up(m, g) for g in POWER_W)), timeout=5)
        assert all(down.gpu_errors(g)["driver_not_loaded"] >= 1 for g in POWER_W)
        time.sleep(2.0)
        driver.set(driver=None)
        end = wait_for("every GPU back", lambda: all_up(scraper) if all(
            energy(scraper.latest(), g) > energy(down, g) for g in POWER_W) else None, timeout=5)
        time.sleep(0.3)
        end = scraper.latest()
    scraper.assert_healthy()
    assert_energy_true(start, end)
    assert sorted((i["gpu"], i["uuid"]) for i in gpu_infos(end)) == \
        sorted((i["gpu"], i["uuid"]) for i in gpu_infos(start))
    log = d.log()
    assert "GPU backend unavailable; will retry" in log and "GPU backend re-initialised" in log


def test_driver_missing_at_start_exits_2(tmp_path, driver):
    """No driver at start: exit 2 at once with one line that says what is wrong and what to do."""
    driver.set(driver="gone")
    with run_wattson(tmp_path, CONFIG, env=driver.env(), wait_ready=False) as d:
        try:
            rc = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wattson kept running without a driver: {d.log()}")
    assert rc == 2
    lines = [ln for ln in d.log().splitlines() if ln.startswith("wattson: error:")]
    assert len(lines) == 1 and "NVIDIA kernel driver is not loaded" in lines[0], d.log()
