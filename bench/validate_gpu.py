"""Validate wattson against a real NVIDIA GPU: energy counter vs integrated power over a minute of load.

Run on a GPU host with PyTorch (for the load) and wattson importable:
    PYTHONPATH=exporter python3 bench/validate_gpu.py --out /tmp/validation

It starts the real daemon (NVML backend, 0.1 s sampling), drives the GPU with a square-wave
matmul load (4 s busy / 2 s idle) for `--seconds`, and compares over the same window:
  1. wattson_gpu_energy_joules_total (from NVML's total-energy counter), scraped at start and end;
  2. NVML's raw counter read directly by this script;
  3. power sampled directly by this script at ~20 Hz, trapezoid-integrated;
  4. what a Prometheus user gets: wattson_gpu_power_watts scraped every 1 s and every 15 s, integrated;
and checks the cost and CO2e counters against energy x price x intensity. Writes JSON + metrics text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pynvml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, sample_value, samples, wait_for  # noqa: E402

PRICE, INTENSITY = 0.25, 400.0
CONFIG = f"""
sampler: {{interval_seconds: 0.1}}
gpu: {{backend: nvml}}
grid:
  carbon: {{zone: DE, sources: [{{type: static, grams_per_kwh: {INTENSITY}}}]}}
  price: {{zone: DE, sources: [{{type: static, price_per_kwh: {PRICE}, currency: EUR}}]}}
"""


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, gpu: str) -> float | None:
    return sample_value(text, name, gpu=gpu)


def trapezoid(samples: list[tuple[float, float]]) -> float:
    return sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:], strict=False))


def load(stop: threading.Event, busy_s: float, idle_s: float) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        t_end = time.monotonic() + busy_s
        while time.monotonic() < t_end and not stop.is_set():
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
        stop.wait(idle_s)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("validation-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
    info = {
        "gpu_name": pynvml.nvmlDeviceGetName(h),
        "driver_version": pynvml.nvmlSystemGetDriverVersion(),
        "nvml_version": pynvml.nvmlSystemGetNVMLVersion(),
        "cuda_driver_version": pynvml.nvmlSystemGetCudaDriverVersion_v2(),
        "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
        "gpu_count": pynvml.nvmlDeviceGetCount(),
    }

    port = free_port()
    cfg = args.out / "wattson.yml"
    cfg.write_text(CONFIG)
    log = open(args.out / "wattson.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    daemon = subprocess.Popen([sys.executable, "-m", "wattson", "--config.file", str(cfg),
                               "--web.listen-address", f"127.0.0.1:{port}",
                               "--storage.path", str(args.out / "data")], stdout=log, stderr=log, env=env)
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200

        wait_for("wattson ready (/readyz 200)", ready, timeout=20)
        time.sleep(1.0)

        stop_load = threading.Event()
        loader = threading.Thread(target=load, args=(stop_load, 4.0, 2.0), daemon=True)
        power: list[tuple[float, float]] = []
        gauge_1s: list[tuple[float, float]] = []
        start_text = scrape(port)
        e0_nvml = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        t0 = time.monotonic()
        loader.start()
        next_scrape = t0
        while time.monotonic() - t0 < args.seconds:
            now = time.monotonic()
            power.append((now, pynvml.nvmlDeviceGetPowerUsage(h) / 1000))
            if now >= next_scrape:
                text = scrape(port)
                w = metric(text, "wattson_gpu_power_watts", str(args.gpu))
                if w is not None:
                    gauge_1s.append((now, w))
                next_scrape += 1.0
            time.sleep(0.05)
        end_text = scrape(port)
        e1_nvml = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        t1 = time.monotonic()
        stop_load.set()
        loader.join(10)

        g = str(args.gpu)
        w0 = metric(start_text, "wattson_gpu_energy_joules_total", g) or 0.0
        w1 = metric(end_text, "wattson_gpu_energy_joules_total", g) or 0.0
        wattson_j = w1 - w0
        nvml_j = (e1_nvml - e0_nvml) / 1000
        direct_j = trapezoid(power)
        gauge_15s = gauge_1s[::15]
        cost = ((metric(end_text, "wattson_gpu_cost_total", g) or 0)
                - (metric(start_text, "wattson_gpu_cost_total", g) or 0))
        grams = ((metric(end_text, "wattson_gpu_co2e_grams_total", g) or 0)
                 - (metric(start_text, "wattson_gpu_co2e_grams_total", g) or 0))
        result = {
            **info,
            "window_s": round(t1 - t0, 3),
            "wattson_energy_j": round(wattson_j, 3),
            "nvml_counter_energy_j": round(nvml_j, 3),
            "direct_power_20hz_integrated_j": round(direct_j, 3),
            "wattson_power_gauge_1s_integrated_j": round(trapezoid(gauge_1s), 3),
            "wattson_power_gauge_15s_integrated_j": round(trapezoid(gauge_15s), 3),
            "mean_power_w": round(nvml_j / (t1 - t0), 1),
            "max_power_w": max(p for _, p in power),
            "min_power_w": min(p for _, p in power),
            "wattson_cost_eur": cost,
            "expected_cost_eur": wattson_j / 3.6e6 * PRICE,
            "wattson_co2e_g": grams,
            "expected_co2e_g": wattson_j / 3.6e6 * INTENSITY,
            "gpu_info": [x.labels for x in samples(end_text) if x.name == "wattson_gpu_info"],
            "gpu_up": metric(end_text, "wattson_gpu_up", g),
            "sampler_errors": [{**x.labels, "count": x.value} for x in samples(end_text)
                               if x.name == "wattson_sampler_errors_total" and x.value > 0],
        }
        for k in ("direct_power_20hz_integrated_j", "wattson_power_gauge_1s_integrated_j",
                  "wattson_power_gauge_15s_integrated_j", "nvml_counter_energy_j"):
            result[k.replace("_j", "_vs_wattson_pct")] = round((result[k] - wattson_j) / wattson_j * 100, 3)
        (args.out / "metrics-end.txt").write_text(end_text)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        daemon.terminate()
        daemon.wait(10)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
