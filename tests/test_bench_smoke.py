"""Smoke test of the benchmarks (bench/): every section runs end to end in a tiny mode, so the code
cannot rot. No timing is asserted; only that each section measured something plausible and the
report renders it. The maths the report relies on is checked against values known exactly."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, energy_accuracy
from tests.conftest import optional_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_percentile_and_line_fit_match_known_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert common.percentile(values, 50) == pytest.approx(50.5)
    assert common.percentile(values, 99) == pytest.approx(99.01)
    assert common.percentile(values, 100) == 100.0
    fit = common.fit_line([0, 1, 2, 3, 4], [10, 12, 14, 16, 18])
    assert fit.slope == pytest.approx(2.0) and fit.intercept == pytest.approx(10.0)
    lo, hi = fit.slope_ci95()
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    noisy = common.fit_line([0, 1, 2, 3, 4, 5], [5, 6, 5, 6, 5, 6])
    lo, hi = noisy.slope_ci95()
    assert lo < 0 < hi  # flat within noise


def test_square_wave_energy_and_prometheus_increase() -> None:
    wave = energy_accuracy.SquareWave("t", 620.0, 2.0, 180.0, 0.5)
    assert wave.energy(2.5) == pytest.approx(620 * 2 + 180 * 0.5)
    assert wave.energy(3.0) == pytest.approx(620 * 2 + 180 * 0.5 + 620 * 0.5)
    step = 0.001
    numeric = sum(wave.power(k * step) * step for k in range(int(7.3 / step)))
    assert numeric == pytest.approx(wave.energy(7.3), rel=1e-3)
    # A counter rising 10/s sampled every 15 s, with the window edges 5 s from the first and last
    # samples: Prometheus extrapolates to the edges, so the increase is the exact 10/s * 60 s.
    samples = [(5.0 + 15 * i, 1000.0 + 150 * i) for i in range(4)]
    assert energy_accuracy.prometheus_increase(samples, 0.0, 60.0) == pytest.approx(600.0)
    # Edges farther than 1.1 intervals away are extrapolated by half an interval only.
    assert energy_accuracy.prometheus_increase(samples, -100.0, 150.0) == pytest.approx(450 * 60 / 45)


def test_counter_method_is_exact_on_a_bursty_profile() -> None:
    import random

    errors = energy_accuracy.trial(energy_accuracy.PROFILES[1], 120.0, random.Random(3))
    assert abs(errors["counter"]) < 0.01
    assert abs(errors["promql_increase_counter_15s"]) < 0.5
    assert set(errors) == set(energy_accuracy.METHODS)


def test_quick_run_measures_every_section_and_writes_the_report(tmp_path: Path) -> None:
    """Without node_exporter the scrape section runs without its reference (locally; CI=true needs it)."""
    node_exporter = optional_tool(*common.NODE_EXPORTER_NAMES)
    out = tmp_path / "benchmarks.md"
    raw = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out), "--json", str(raw),
         "--requests", "32", "--memory-minutes", "0.05", "--loop-seconds", "0.5", "--rounds", "50",
         "--energy-trials", "1", "--energy-window", "120", "--trace-minutes", "0.05"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(raw.read_text())

    ex = results["exposition"]
    assert ex["per_gpu"]["series"] >= 13  # one series per per-GPU family at least
    assert all(r["gzip_bytes"] < r["plain_bytes"] for r in ex["rows"])

    for profile in results["energy"]["profiles"]:
        assert abs(profile["errors"]["counter"]["max_abs_error_pct"]) < 0.01

    sa = results["sampler"]
    for backend in sa["backends"].values():
        assert backend["per_round"]["cpu_seconds_per_round"] > 0
        assert backend["loop"]["10hz"]["rounds"] > 0

    sc = results["scrape"]
    assert ("error" in sc["targets"]["node_exporter"]) == (node_exporter is None), sc["targets"]["node_exporter"]
    for name, target in sc["targets"].items():
        if name == "node_exporter" and node_exporter is None:
            continue  # reference not installed on this machine
        for run in target["runs"].values():
            assert run["errors"] == 0 and run["p99_ms"] > 0 and run["p50_ms"] <= run["p99_ms"]
    for n in sc["gpu_counts"]:
        assert sc["targets"][f"wattson_{n}gpu"]["series"] > n * 13
    # With the HTTP price source, wattson priced from the fake API server, which saw its fetches.
    for name, target in sc["targets"].items():
        if "http_source_up" in target:
            assert target["http_source_up"] is True and target["fixture_requests"] > 0, (name, target)

    me = results["memory"]
    assert me["scrapes_ok"] > 0 and me["scrapes_failed"] == 0
    assert 0 < me["rss_after_start_bytes"] <= me["rss_peak_bytes"]
    assert me["threads_min_max"][0] > 1 and me["fds_min_max"][0] > 2
    if me["http_source_up_at_end"] is not None:
        assert me["http_source_up_at_end"] is True and me["price_api_fetch_seconds"], me

    tr = results["memory_trace"]
    assert tr["rounds"] > 0 and tr["scrapes"] > 0 and tr["scrapes_failed"] == 0
    assert tr["traced_bytes_start"] > 0 and tr["top_growth"]

    ru = results["rules"]
    if optional_tool("prometheus") is None:
        assert "error" in ru, ru
    else:
        measured = {r["rule"]: r for r in ru["sizes"][0]["rules"]}
        assert all(r["health"] == "ok" for r in measured.values()), measured
        assert {r["group"] for r in measured.values()} >= {"wattson.periods", "wattson.forecast", "baseline.accounting"}
        new, old = (measured["instance:wattson_gpu_net_cost:month_to_date"],
                    measured["baseline_instance:wattson_gpu_net_cost:month_to_date"])
        assert 0 < new["samples"] < old["samples"], (new, old)
        assert new["input_series"] > 0 and ru["extrapolated"]

    text = out.read_text()
    for heading in ("## Summary", "## 1. Scrape latency", "## 2. Sampler cost", "## 3. Energy accuracy",
                    "## 4. Memory", "## 4b. Memory: what grows", "## 5. Exposition size", "## 6. Rule cost"):
        assert heading in text
    assert "**quick**" in text and "Machine:" in text and "prometheus_client" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert not math.isnan(results["meta"]["duration_minutes"])

    # The report is a pure function of the results: re-rendering them gives the same file.
    again = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--render-from", str(raw),
                           "--out", str(again)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert again.read_text() == text
