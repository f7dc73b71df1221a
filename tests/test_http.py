"""The HTTP endpoint scraped for real over a socket, and its exposition checked by promtool."""

from __future__ import annotations

import base64
import gzip
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from bench.common import sample_value, samples
from tests.conftest import require_tool
from tests.daemon import get, run_wattson

pytestmark = pytest.mark.integration

SIM_CONFIG = """
gpu:
  backend: simulated
  simulated: {count: 3, profiles: [training, inference, idle], seed: 7}
sampler: {interval_seconds: 0.2}
grid:
  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}
  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.25, currency: EUR}]}
budgets: {cost_per_month: 100, co2e_grams_per_month: 50000, carbon_intensity_threshold_grams_per_kwh: 300}
"""

REQUIRED = [
    "wattson_gpu_info", "wattson_gpu_up", "wattson_gpu_power_watts", "wattson_gpu_power_limit_watts",
    "wattson_gpu_energy_joules_total", "wattson_gpu_memory_used_bytes", "wattson_gpu_memory_total_bytes",
    "wattson_gpu_utilization_ratio", "wattson_build_info", "wattson_sampler_duration_seconds",
    "wattson_sampler_errors_total", "wattson_last_sample_timestamp_seconds", "wattson_gpu_cost_total",
    "wattson_gpu_co2e_grams_total", "wattson_grid_carbon_intensity_grams_per_kwh",
    "wattson_electricity_price_per_kwh", "wattson_grid_signal_info", "wattson_grid_signal_age_seconds",
    "wattson_source_up", "wattson_source_errors_total", "wattson_source_last_success_timestamp_seconds",
    "wattson_pue", "wattson_budget_cost", "wattson_budget_co2e_grams",
    "wattson_carbon_intensity_threshold_grams_per_kwh",
]


def value(text: str, name: str, **labels: str) -> float:
    found = sample_value(text, name, **labels)
    if found is None:
        raise KeyError(name)
    return found


def test_scrape_over_a_socket_passes_promtool(tmp_path):
    with run_wattson(tmp_path, SIM_CONFIG) as d:
        time.sleep(1.0)
        first = d.metrics()
        time.sleep(1.0)
        second = d.metrics()
        parsed = samples(second)
        names = {s.name for s in parsed}
        for name in REQUIRED:
            assert name in names, f"{name} missing"
        # every per-GPU series carries gpu and uuid; the simulation is labelled as such
        assert any(s.labels.get("backend") == "simulated" for s in parsed if s.name == "wattson_gpu_info")
        for s in parsed:
            if s.name.startswith("wattson_gpu_"):
                assert "gpu" in s.labels and "uuid" in s.labels, s
        assert {s.name for s in parsed if s.name.startswith("process_")} >= {
            "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "process_start_time_seconds"}
        # counters rise, and the cost is energy x price
        e1 = value(first, "wattson_gpu_energy_joules_total", gpu="0")
        e2 = value(second, "wattson_gpu_energy_joules_total", gpu="0")
        assert e2 > e1 > 0
        cost = value(second, "wattson_gpu_cost_total", gpu="0", currency="EUR")
        assert cost == pytest.approx(e2 / 3.6e6 * 0.25, rel=1e-9)
        grams = value(second, "wattson_gpu_co2e_grams_total", gpu="0")
        assert grams == pytest.approx(e2 / 3.6e6 * 380, rel=1e-9)
        # no timestamps on samples
        assert all(s.timestamp is None for s in parsed)
        promtool = require_tool("promtool")
        check = subprocess.run([promtool, "check", "metrics"], input=second, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", \
            check.stdout + check.stderr


def test_endpoints_and_gzip(tmp_path):
    with run_wattson(tmp_path, SIM_CONFIG) as d:
        status, headers, body = get(d.base + "/")
        assert status == 200 and b"Simulated GPUs" in body and b"/metrics" in body
        assert get(d.base + "/healthz")[0] == 200
        assert get(d.base + "/readyz")[0] == 200
        assert get(d.base + "/nope")[0] == 404
        status, headers, body = get(d.base + "/metrics", **{"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert b"wattson_gpu_power_watts" in gzip.decompress(body)
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


def https_get(url: str, ctx: ssl.SSLContext, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_web_config_file_puts_the_daemon_behind_tls_and_basic_auth(tmp_path):
    openssl = require_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-keyout", "server.key", "-out", "server.crt", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=30)
    hashed = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web-config.yml"
    web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
    auth = "Basic " + base64.b64encode(b"prometheus:scrape-secret").decode()
    with run_wattson(tmp_path, SIM_CONFIG, "--web.config.file", str(web), wait_ready=False) as d:
        url = f"https://127.0.0.1:{d.port}"
        deadline = time.monotonic() + 20
        while True:  # the daemon's readiness, asked over TLS with the password
            assert d.proc.poll() is None, d.log()
            try:
                if https_get(url + "/readyz", ctx, auth)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        status, headers, _ = https_get(url + "/metrics", ctx)
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="wattson"'
        assert https_get(url + "/metrics", ctx, "Basic " + base64.b64encode(b"prometheus:guess").decode())[0] == 401
        status, _, body = https_get(url + "/metrics", ctx, auth)
        assert status == 200 and b"wattson_gpu_power_watts" in body
        with pytest.raises(OSError):
            get(d.base + "/metrics")  # plain HTTP on the TLS port
    assert "scrape-secret" not in d.log() and hashed not in d.log()


def test_api_endpoints_answer_json_with_etag_and_the_carbon_aware_sdk_shape(tmp_path):
    with run_wattson(tmp_path, SIM_CONFIG) as d:
        status, headers, body = get(d.base + "/api/v1/grid")
        assert status == 200 and headers["Content-Type"] == "application/json"
        grid = json.loads(body)
        assert {(s["signal"], s["zone"]) for s in grid["signals"]} == {("carbon", "DE"), ("price", "DE")}
        assert get(d.base + "/api/v1/grid", **{"If-None-Match": headers["ETag"]})[0] == 304
        assert get(d.base + "/api/v1/grid?zone=FR")[0] == 404
        status, _headers, body = get(d.base + "/api/v1/forecast?signal=carbon&window=1h")
        assert status == 200
        (answer,) = json.loads(body)
        assert answer["location"] == "DE" and answer["windowSize"] == 60
        assert answer["optimalDataPoints"] and answer["forecastData"]
        assert get(d.base + "/api/v1/forecast?signal=wind")[0] == 400
