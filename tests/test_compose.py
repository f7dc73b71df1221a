"""docker-compose.yml, .env.example and exporter/Dockerfile: schema-valid and built the way the stack
promises (pinned images, localhost ports, read-only mounts, healthchecks, no default password,
GPU and simulated variants). Docker itself is not needed: the schema check runs check-jsonschema
with its bundled copy of the compose specification, which works offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "exporter" / "Dockerfile"
SERVICES = {"wattson", "wattson-sim", "prometheus", "alertmanager", "grafana"}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and ${VAR?error}."""
    def repl(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else str(value)
        if op in (":?", "?"):
            if empty:
                raise ValueError(f"{name}: {arg}")
            return str(value)
        return value or ""
    return VARIABLE.sub(repl, text)


def test_services_volumes_and_name() -> None:
    doc = compose()
    assert set(doc["services"]) == SERVICES
    assert doc["name"] == "wattson"
    assert set(doc["volumes"]) == {"prometheus-data", "alertmanager-data", "grafana-data"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_is_hardened_and_healthchecked(service: str) -> None:
    s = compose()["services"][service]
    assert s["read_only"] is True, f"{service}: read_only"
    assert s["cap_drop"] == ["ALL"], f"{service}: cap_drop"
    assert "no-new-privileges:true" in s["security_opt"], f"{service}: no-new-privileges"
    assert "cap_add" not in s and "privileged" not in s, f"{service}: extra privileges"
    hc = s["healthcheck"]
    assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] >= 3, f"{service}: healthcheck"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_ports_bind_to_localhost_by_default(service: str) -> None:
    for port in compose()["services"][service]["ports"]:
        assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{service}: port {port}"
        published = interpolate(port, {})
        assert published.startswith("127.0.0.1:"), published


def test_images_are_pinned_to_real_release_tags() -> None:
    images = {name: s["image"] for name, s in compose()["services"].items()}
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", images["prometheus"])
    assert re.fullmatch(r"prom/alertmanager:v\d+\.\d+\.\d+", images["alertmanager"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", images["grafana"])
    assert images["wattson"] == images["wattson-sim"]
    for image in images.values():
        assert not image.endswith(":latest") and ":" in image


def test_config_mounts_are_read_only_and_exist() -> None:
    env = env_example()
    for name, s in compose()["services"].items():
        for volume in s.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":")[0]
                assert source in compose()["volumes"], f"{name}: {volume} is not a named volume"
                continue
            assert volume["type"] == "bind" and volume["read_only"] is True, f"{name}: {volume}"
            source = ROOT / interpolate(volume["source"], env)
            assert source.exists(), f"{name}: mount source {source} does not exist"


def test_grafana_mounts_match_provisioning_and_needs_a_password() -> None:
    g = compose()["services"]["grafana"]
    targets = {v["target"]: v["source"] for v in g["volumes"] if isinstance(v, dict)}
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/wattson.yml").read_text())["providers"][0]
    assert targets[provider["options"]["path"]] == "./grafana/dashboards"
    assert targets["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert g["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GF_SECURITY_ADMIN_PASSWORD:?")
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana/dashboards" / Path(home).name).exists()


def test_no_default_grafana_password() -> None:
    text = COMPOSE.read_text()
    env = env_example()
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "", ".env.example must not ship a password"
    with pytest.raises(ValueError, match="GF_SECURITY_ADMIN_PASSWORD"):
        interpolate(text, env)
    with pytest.raises(ValueError, match="GF_SECURITY_ADMIN_PASSWORD"):
        interpolate(text, {})
    rendered = yaml.safe_load(interpolate(text, {**env, "GF_SECURITY_ADMIN_PASSWORD": "s3cret"}))
    assert rendered["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"


def test_every_variable_without_a_default_is_in_env_example() -> None:
    env = env_example()
    for m in VARIABLE.finditer(COMPOSE.read_text()):
        name, op = m.group(1), m.group(2)
        if op in (None, ":?", "?"):
            assert name in env, f"docker-compose.yml uses ${{{name}}} without a default; add it to .env.example"
    assert env["COMPOSE_PROFILES"] == "gpu"


def test_gpu_variant_reserves_nvidia_gpus_and_sim_variant_simulates() -> None:
    services = compose()["services"]
    gpu, sim = services["wattson"], services["wattson-sim"]
    assert gpu["profiles"] == ["gpu"] and sim["profiles"] == ["sim"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in sim
    assert "--simulate" in sim["command"] and "--simulate" not in gpu["command"]
    assert sim["networks"]["default"]["aliases"] == ["wattson"]
    for s in (gpu, sim):
        assert s["build"] == {"context": ".", "dockerfile": "exporter/Dockerfile"}
        assert "--config.file=/etc/wattson/wattson.yml" in s["command"]
        assert "/tmp" in s["tmpfs"]
    for name in ("prometheus", "grafana", "alertmanager"):
        assert "wattson" not in services[name].get("depends_on", {}), f"{name} must not need a profile's service"


def test_prometheus_keeps_a_month_of_data_and_targets_the_wattson_name() -> None:
    p = compose()["services"]["prometheus"]
    retention = [a for a in p["command"] if a.startswith("--storage.tsdb.retention.time=")]
    value = interpolate(retention[0].split("=", 1)[1], env_example())
    m = re.fullmatch(r"(\d+)d", value)
    assert m and int(m.group(1)) >= 32, f"retention {value} is shorter than a month"
    targets = yaml.safe_load((ROOT / "prometheus/targets/wattson.yml").read_text())
    assert any("wattson:9874" in entry["targets"] for entry in targets)


def test_dockerfile_runs_unprivileged_with_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(re.fullmatch(r"python:3\.12(\.\d+)?-slim(-bookworm)?", f) for f in froms), froms
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"^EXPOSE\s+9874$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert re.search(r'^ENTRYPOINT \["wattson"\]', text, re.M)
    assert "setcap" not in text and "chmod u+s" not in text
    ignore = (ROOT / "exporter" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:4] == ["*", "!pyproject.toml", "!README.md", "!exporter/"]


def _check_jsonschema() -> str:
    path = shutil.which("check-jsonschema")
    if path is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema)")
    return path


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_compose_file_matches_the_compose_spec() -> None:
    res = _validate(COMPOSE)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.integration
def test_interpolated_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    env = {**env_example(), "GF_SECURITY_ADMIN_PASSWORD": "s3cret"}
    rendered = tmp_path / "docker-compose.yml"
    rendered.write_text(interpolate(COMPOSE.read_text(), env))
    res = _validate(rendered)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.integration
def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n      test:", "    healthchek:\n      test:", 1))
    res = _validate(broken)
    assert res.returncode != 0 and "healthchek" in res.stdout + res.stderr
