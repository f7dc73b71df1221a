"""NvmlBackend through real pynvml and ctypes, against the fake libnvidia-ml.so.1 built from C.

Each test runs tests/fake_libnvml/probe.py in a subprocess whose LD_LIBRARY_PATH leads to the fake,
changes the control file between commands, and checks what came through the C ABI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_c_compiler
from tests.fake_libnvml import PROBE, build_fake_libnvml, fake_nvml_env, write_control

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_790_000_000.0  # frozen time of the fake driver: energies are predictable to the millijoule
ORIGIN = NOW - 10_000.0  # counters started 10 000 s earlier


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory) -> Path:
    require_c_compiler()
    return build_fake_libnvml(tmp_path_factory.mktemp("fake-libnvml"))


class Probe:
    """The probe subprocess: one command in, one JSON answer out."""

    def __init__(self, lib: Path, control: Path) -> None:
        env = fake_nvml_env(lib, control)
        env["PYTHONPATH"] = str(ROOT / "exporter") + os.pathsep + env.get("PYTHONPATH", "")
        self.err: str | None = None
        self.proc = subprocess.Popen([sys.executable, str(PROBE)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"probe exited on {command!r}: {self.proc.communicate(timeout=5)[1]}")
        return json.loads(line)

    def close(self) -> str:
        """Stop the probe; returns its stderr."""
        if self.err is None:
            _, self.err = self.proc.communicate("quit\n", timeout=10)
        return self.err


@pytest.fixture
def probe(fake_lib, tmp_path):
    control = tmp_path / "nvml.control"
    settings: dict[str, object] = {}

    def configure(**changes: object) -> None:
        settings.update({k.replace("__", "."): v for k, v in changes.items()})
        write_control(control, settings)

    configure(gpus=2, now=NOW, driver_version="550.54.15",
              gpu__0__power_w=250.5, gpu__0__energy_origin=ORIGIN, gpu__0__memory_used=20 * 2**30,
              gpu__0__memory_reserved=600 * 2**20, gpu__0__util_pct=87,
              gpu__1__uuid="GPU-8d2f7c1e-33b1-4c55-9a0e-1f0a2b3c4d5e", gpu__1__name="NVIDIA A100-SXM4-80GB",
              gpu__1__pci_bus_id="00000000:CA:00.0", gpu__1__mig=1, gpu__1__power_limit_w=400,
              gpu__1__profile="square", gpu__1__high_w=650, gpu__1__high_s=2, gpu__1__low_w=90,
              gpu__1__low_s=1, gpu__1__energy_origin=ORIGIN)
    p = Probe(fake_lib, control)
    p.configure = configure  # type: ignore[attr-defined]
    yield p
    p.close()


def test_identity_power_energy_and_memory_through_the_c_abi(probe, fake_lib):
    devices = probe.ask("start")["devices"]
    assert probe.ask("lib")["lib"] == str(fake_lib)  # the fake answered, not a real driver
    assert devices[0] == {"index": 0, "uuid": "GPU-00000000-fa6e-4000-8000-000000000000",
                          "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "00000000:18:00.0",
                          "driver_version": "550.54.15", "mig_enabled": False}
    assert devices[1] == {"index": 1, "uuid": "GPU-8d2f7c1e-33b1-4c55-9a0e-1f0a2b3c4d5e",
                          "name": "NVIDIA A100-SXM4-80GB", "pci_bus_id": "00000000:CA:00.0",
                          "driver_version": "550.54.15", "mig_enabled": True}

    a, b = probe.ask("read")["readings"]
    assert a["power_watts"] == 250.5 and a["power_limit_watts"] == 700.0
    assert a["energy_millijoules"] == 250.5 * 10_000 * 1000
    # v2 memory info: reserved memory is not counted as used
    assert (a["memory_used_bytes"], a["memory_total_bytes"]) == (20 * 2**30, 80 * 2**30)
    assert a["utilization_ratio"] == 0.87
    # NOW is 2 s into a 3 s period (NOW % 3 == 2): the low phase. The 10 000 s from ORIGIN are 3333 whole
    # periods of 1390 J and then 1 s from phase 1 to phase 2, which is high: 650 J.
    assert b["power_watts"] == 90.0 and b["power_limit_watts"] == 400.0
    assert b["energy_millijoules"] == (3333 * (650 * 2 + 90 * 1) + 650) * 1000

    probe.configure(now=NOW + 1.5)  # 1 s low, then 0.5 s high
    a2, b2 = probe.ask("read")["readings"]
    assert a2["energy_millijoules"] - a["energy_millijoules"] == 375_750  # 250.5 W * 1.5 s
    assert b2["energy_millijoules"] - b["energy_millijoules"] == (90 * 1 + 650 * 0.5) * 1000
    assert b2["power_watts"] == 650.0


def test_error_kinds_unsupported_metrics_and_restart_through_the_c_abi(probe):
    assert len(probe.ask("start")["devices"]) == 2

    probe.configure(gpu__1__error="gpu_lost", gpu__0__error__nvmlDeviceGetPowerUsage="timeout")
    a, b = probe.ask("read")["readings"]
    assert (a["error"], a["reinit"]) == ("timeout", False)
    assert a["message"] == ("GPU 0 (GPU-00000000-fa6e-4000-8000-000000000000): "
                            "nvmlDeviceGetPowerUsage: Timeout")
    assert (b["error"], b["reinit"]) == ("gpu_lost", False)
    assert b["message"].endswith(": nvmlDeviceGetPowerUsage: GPU is lost")

    probe.configure(gpu__1__error="success", gpu__0__error__nvmlDeviceGetPowerUsage="success",
                    gpu__0__energy="unsupported", gpu__0__util_pct="unsupported", gpu__0__memory_v2=0,
                    gpu__1__power_limit_w="unsupported")
    a, b = probe.ask("read")["readings"]
    assert a["power_watts"] == 250.5 and a["energy_millijoules"] is None and a["utilization_ratio"] is None
    assert a["memory_used_bytes"] == 20 * 2**30 + 600 * 2**20  # v1 fallback counts reserved memory as used
    assert b["power_limit_watts"] is None and b["energy_millijoules"] is not None

    probe.configure(driver="gone")
    a, b = probe.ask("read")["readings"]
    assert (a["error"], a["reinit"]) == ("driver_not_loaded", True)
    unavailable = probe.ask("restart")["unavailable"]
    assert "nvmlInit: Driver Not Loaded" in unavailable and "--simulate" in unavailable
    assert "\n" not in unavailable

    probe.configure(driver="loaded", gpu__1__energy_origin=NOW - 2)  # driver reload reset GPU 1's counter
    devices = probe.ask("restart")["devices"]
    assert [d["uuid"] for d in devices] == ["GPU-00000000-fa6e-4000-8000-000000000000",
                                             "GPU-8d2f7c1e-33b1-4c55-9a0e-1f0a2b3c4d5e"]
    a, b = probe.ask("read")["readings"]
    assert a["energy_millijoules"] is None  # still no counter on GPU 0 after re-initialisation
    assert b["energy_millijoules"] == 650 * 2 * 1000  # NOW-2 .. NOW is the whole high phase (NOW % 3 == 2)


def test_init_failure_then_recovery_and_slow_driver(probe):
    probe.configure(init_error="no_permission")
    unavailable = probe.ask("start")["unavailable"]
    assert unavailable.startswith(
        "no permission to use the NVIDIA driver (nvmlInit: Insufficient Permissions)")
    probe.configure(init_error="success", gpus=1, gpu__0__hang_ms=100)
    assert len(probe.ask("start")["devices"]) == 1
    (reading,) = probe.ask("read")["readings"]
    assert reading["power_watts"] == 250.5
    assert reading["elapsed_s"] >= 0.1 * 5  # each of the five device calls of a read waited
    probe.configure(gpus=0)  # the GPU fell off the bus
    (reading,) = probe.ask("read")["readings"]
    assert reading["error"] == "gpu_lost"
    assert probe.ask("close") == {"closed": True}


def test_broken_control_file_is_reported_with_file_and_line(probe, tmp_path):
    control = tmp_path / "nvml.control"
    control.write_text("gpus=1\ngpu.0.pwer_w=100\n")
    unavailable = probe.ask("start")["unavailable"]
    assert "nvmlInit: Unknown Error" in unavailable
    err = probe.close()
    assert f"fake libnvidia-ml: {control}:2: unknown key or bad value 'gpu.0.pwer_w=100'" in err
