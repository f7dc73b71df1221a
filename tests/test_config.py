"""Bad configuration: exit 2, one line, naming the file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wattson.config import ConfigError, load_config, parse_config
from wattson.yamlfile import MAX_BYTES, MAX_EXPANDED_NODES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, needle", [
    ("sampler:\n  interval_secs: 1\n", "sampler.interval_secs: unknown key"),  # unknown key
    ("sampler:\n  interval_seconds: fast\n", "sampler.interval_seconds: Input should be a valid number"),  # type
    ("sampler:\n  interval_seconds: 0.01\n", "sampler.interval_seconds: Input should be greater than or equal to 0.1"),
    ("gpu:\n  backend: amd\n", "gpu.backend: Input should be 'nvml', 'simulated' or 'none'"),  # enum
    ("grid:\n  pue: 0.5\n", "grid.pue: Input should be greater than or equal to 1"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 0.3\n",
     "grid.price.sources[0].currency: required key is missing"),
    ("grid:\n  price:\n    sources:\n      - type: nordpool\n", "grid.price.sources[0]"),  # unknown source type
    ("grid:\n  carbon:\n    sources: []\n", "grid.carbon.sources: List should have at least 1 item"),
    ("gpu:\n  simulated:\n    model: Z9000\n", "gpu.simulated.model: Value error, unknown model 'Z9000'"),
    ("web:\n  listen_address: nine\n", "web.listen_address: Value error, expected host:port"),
    ("- a\n- b\n", "(top level): expected a mapping"),
    ("sampler: [\n", "invalid YAML"),
    ("sampler:\n  interval_seconds: 1\nsampler:\n  interval_seconds: 2\n",
     "wattson.yml:3: sampler: duplicate key (first at line 1)"),  # not silently the last one
    # No NaN or infinity anywhere: one rule for every number of the file.
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: .nan\n        currency: EUR\n",
     "wattson.yml:5: grid.price.sources[0].price_per_kwh: Input should be a finite number"),
    ("grid:\n  pue: .inf\n", "wattson.yml:2: grid.pue: Input should be a finite number"),
    ("budgets:\n  cost_per_day: .nan\n", "wattson.yml:2: budgets.cost_per_day: Input should be a finite number"),
    ("sampler:\n  max_power_watts: .inf\n", "sampler.max_power_watts: Input should be a finite number"),
    ("grid:\n  carbon:\n    sources:\n      - type: static\n        grams_per_kwh: -.inf\n",
     "grid.carbon.sources[0].grams_per_kwh: Input should be a finite number"),
    # Prices beyond the currency's bound, as exported (after adder and multiplier).
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 150\n        currency: EUR\n",
     "wattson.yml:5: grid.price.sources[0].price_per_kwh: not a plausible price: exported as 150 EUR/kWh"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 60\n        currency: EUR\n"
     "        multiplier: 2\n", "wattson.yml:5: grid.price.sources[0].price_per_kwh: not a plausible price: "
     "exported as 120 EUR/kWh"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 150000\n        currency: KRW\n"
     "        adder_per_kwh: 60000\n", "wattson.yml:5: grid.price.sources[0].price_per_kwh: not a plausible price"),
    ("grid:\n  price:\n    sources:\n      - type: tou\n        timezone: Asia/Tokyo\n        currency: JPY\n"
     "        bands:\n          - {days: all, start: '00:00', end: '12:00', price_per_kwh: 30}\n"
     "          - {days: all, start: '12:00', end: '24:00', price_per_kwh: 30000}\n",
     "wattson.yml:9: grid.price.sources[0].bands[1].price_per_kwh: not a plausible price: exported as 30000 JPY"),
    ("grid:\n  price:\n    sources:\n      - type: tou\n        timezone: Europe/Berlin\n        currency: EUR\n"
     "        default_price_per_kwh: -120\n        bands:\n"
     "          - {days: all, start: '00:00', end: '12:00', price_per_kwh: 0.3}\n",
     "wattson.yml:7: grid.price.sources[0].default_price_per_kwh: not a plausible price"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 1\n        currency: EUR\n"
     "        max_abs_price_per_kwh: 0\n", "grid.price.sources[0].max_abs_price_per_kwh: Input should be greater"),
])
def test_each_class_of_mistake_names_the_key(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "wattson.yml")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("wattson.yml")
    assert needle in msg, msg


@pytest.mark.parametrize("text", [
    "grid:\n  price:\n    zone: KR\n    sources:\n      - {type: static, price_per_kwh: 150, currency: KRW}\n",
    "grid:\n  price:\n    sources:\n      - {type: static, price_per_kwh: 150, currency: EUR,\n"
    "         max_abs_price_per_kwh: 200}\n",
    "grid:\n  price:\n    sources:\n      - {type: static, price_per_kwh: -99, currency: EUR}\n",
    "grid:\n  price:\n    sources:\n      - type: tou\n        timezone: Asia/Tokyo\n        currency: JPY\n"
    "        bands:\n          - {days: all, start: '00:00', end: '24:00', price_per_kwh: 31.5}\n",
])
def test_plausible_prices_in_any_currency_start(text):
    parse_config(text, "wattson.yml")


def test_null_signal_is_disabled_and_left_out_is_the_default():
    cfg = parse_config("grid:\n  price: null\n", "w.yml")
    assert cfg.grid.price is None and cfg.grid.carbon is not None
    assert parse_config("grid:\n  pue: 1.1\n", "w.yml").grid.price is not None


def test_error_names_the_line():
    with pytest.raises(ConfigError) as exc:
        parse_config("log_level: info\nsampler:\n  interval_secs: 1\n", "w.yml")
    assert str(exc.value).startswith("w.yml:3: sampler.interval_secs")


def test_error_line_survives_union_tags():
    # pydantic puts the source type into the error location; the line is still that of the key written
    text = "grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 0.3\n        currency: euro\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "w.yml")
    assert str(exc.value).startswith("w.yml:6: grid.price.sources[0].currency: "), str(exc.value)


def _alias_bomb() -> bytes:
    """Seven lines that stand for ten million values once every alias is expanded."""
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("content, expected", [
    (b"sampler:\n  interval_seconds: 1\nlog_level: info\nsampler:\n  interval_seconds: 2\n",
     ":4: sampler: duplicate key (first at line 1)"),
    (b"grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 0.3\n        currency: EUR\n"
     b"        price_per_kwh: 0.4\n", ":7: grid.price.sources[0].price_per_kwh: duplicate key (first at line 5)"),
    (b"grid:\n  carbon: {zone: DE, zone: FR}\n", ":2: grid.carbon.zone: duplicate key (first at line 2)"),
    (b"log_level: info\ngrid:\n  carbon:\n    zone: K\xf6ln\n",
     ":4: (file): not UTF-8 text: byte 0xf6 at column 12 (byte offset 43)"),
    (b"\xef\xbb\xbfsampler:\n  interval_seconds: 0.01\n", ":2: sampler.interval_seconds: "),  # a BOM is fine
    (b"#" * (MAX_BYTES + 1), ": (file): larger than 1 MiB"),
    (_alias_bomb(), f": more than {MAX_EXPANDED_NODES} values"),
    (b"gpu: &g\n  simulated: *g\n", ":2: gpu.simulated: an alias refers to a node that contains it"),
    (b"sampler:\n  interval_seconds: !!python/object:os.system 1\n", ":2: (yaml): invalid YAML: could not determine "
                                                                     "a constructor"),  # safe tags only
])
def test_file_problems_name_the_file_line_and_key(tmp_path, content, expected):
    path = tmp_path / "wattson.yml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    msg = str(exc.value)
    assert msg.startswith(str(path)) and expected in msg, msg
    assert "\n" not in msg


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


@pytest.mark.parametrize("text, needle", [
    ("grid:\n  pue: 9\n", ":2: grid.pue: "),
    ("grid:\n  pue: 1.2\ngrid:\n  pue: 1.3\n", ":3: grid: duplicate key (first at line 1)"),
    ("grid:\n  price:\n    sources:\n      - type: static\n        price_per_kwh: 150\n        currency: EUR\n",
     ":5: grid.price.sources[0].price_per_kwh: not a plausible price"),
])
def test_cli_exits_2_with_one_line_for_a_bad_config(tmp_path, text, needle):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    proc = run_cli("--config.file", str(cfg), "--simulate")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{cfg}{needle}" in lines[0], proc.stderr


def test_cli_exits_2_with_one_line_for_a_bad_web_config(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("http_server_config:\n  http2: true\nhttp_server_config:\n  http2: false\n")
    proc = run_cli("--web.config.file", str(web), "--simulate", "--web.listen-address", "127.0.0.1:0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{web}:3: http_server_config: duplicate key (first at line 1)" in lines[0], \
        proc.stderr


def test_cli_exits_2_for_a_missing_config_file(tmp_path):
    proc = run_cli("--config.file", str(tmp_path / "nope.yml"))
    assert proc.returncode == 2 and "(file): cannot read: No such file or directory" in proc.stderr


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
