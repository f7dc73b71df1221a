"""Bad configuration: exit 2, one line, naming the file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wattson.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, needle", [
    ("sampler:\n  interval_secs: 1\n", "sampler.interval_secs: unknown key"),  # unknown key
    ("sampler:\n  interval_seconds: fast\n", "sampler.interval_seconds: Input should be a valid number"),  # type
    ("sampler:\n  interval_seconds: 0.01\n", "sampler.interval_seconds: Input should be greater than or equal to 0.1"),
    ("gpu:\n  backend: amd\n", "gpu.backend: Input should be 'nvml' or 'simulated'"),  # enum
    ("grid:\n  pue: 0.5\n", "grid.pue: Input should be greater than or equal to 1"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 0.3\n",
     "grid.price.sources[0].currency: required key is missing"),
    ("grid:\n  price:\n    sources:\n      - type: nordpool\n", "grid.price.sources[0]"),  # unknown source type
    ("grid:\n  carbon:\n    sources: []\n", "grid.carbon.sources: List should have at least 1 item"),
    ("gpu:\n  simulated:\n    model: Z9000\n", "gpu.simulated.model: Value error, unknown model 'Z9000'"),
    ("web:\n  listen_address: nine\n", "web.listen_address: Value error, expected host:port"),
    ("- a\n- b\n", "(top level): expected a mapping"),
    ("sampler: [\n", "invalid YAML"),
])
def test_each_class_of_mistake_names_the_key(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "wattson.yml")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("wattson.yml")
    assert needle in msg, msg


def test_error_names_the_line():
    with pytest.raises(ConfigError) as exc:
        parse_config("log_level: info\nsampler:\n  interval_secs: 1\n", "w.yml")
    assert str(exc.value).startswith("w.yml:3: sampler.interval_secs")


def test_example_config_is_valid():
    parse_config((ROOT / "docs" / "wattson.example.yml").read_text(), "example")


def test_every_key_is_documented():
    """docs/configuration.md must mention every key of the schema with its default."""
    from wattson.config import Config

    doc = (ROOT / "docs" / "configuration.md").read_text()

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            yield path
            ann = field.annotation
            sub = getattr(ann, "model_fields", None)
            if sub is not None:
                yield from walk(ann, path + ".")

    missing = [p for p in walk(Config) if f"`{p}`" not in doc]
    assert not missing, f"undocumented keys: {missing}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattson", *args], capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(ROOT / "exporter"), "PATH": "/usr/bin:/bin"})


def test_cli_exits_2_with_one_line_for_a_bad_config(tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text("grid:\n  pue: 9\n")
    proc = run_cli("--config.file", str(cfg), "--simulate")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "grid.pue" in lines[0] and str(cfg) in lines[0]


def test_cli_exits_2_for_a_missing_config_file(tmp_path):
    proc = run_cli("--config.file", str(tmp_path / "nope.yml"))
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr


def test_cli_without_nvml_exits_2_and_suggests_simulate(tmp_path):
    """This machine has no NVIDIA driver: without --simulate wattson must refuse, not simulate silently."""
    proc = run_cli("--web.listen-address", "127.0.0.1:0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--simulate" in lines[0]


def test_sources_doc_is_generated_from_the_models():
    from wattson.sourcedoc import render

    assert (ROOT / "docs" / "sources.md").read_text() == render(), \
        "docs/sources.md drifted: run `PYTHONPATH=exporter python -m wattson.sourcedoc > docs/sources.md`"


def test_simulated_demo_config_is_valid():
    cfg = parse_config((ROOT / "docs" / "wattson.simulated.yml").read_text(), "simulated")
    assert cfg.gpu.backend == "simulated" and cfg.workloads.enabled
