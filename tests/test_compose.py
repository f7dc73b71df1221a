"""docker-compose.yml, .env.example and exporter/Dockerfile: valid, and consistent with what they start.

Docker itself is not needed. The compose file is checked against the compose specification (the copy
bundled with check-jsonschema, which works offline), interpolated the way compose does it, and
cross-checked with the things it wires together: wattson's own command-line parser and default port,
Prometheus's targets, Grafana's provisioning, the mount sources in the repository. The Dockerfile's
entry point, user, port and healthcheck are checked against the package and a running daemon.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bench.common import free_port
from tests.conftest import require_tool
from tests.daemon import run_wattson

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "exporter" / "Dockerfile"
DOCKERIGNORE = ROOT / "exporter" / "Dockerfile.dockerignore"
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
GRAFANA_DEFAULT_PORT = 3000  # Grafana's http_port unless GF_SERVER_HTTP_PORT says otherwise


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def wattson_services() -> dict[str, dict[str, Any]]:
    """The services that run the wattson image (built from exporter/Dockerfile)."""
    return {name: s for name, s in services().items() if "build" in s}


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


def wattson_default_port() -> int:
    from wattson.config import WebConfig, parse_listen_address

    return parse_listen_address(WebConfig().listen_address)[1]


def listen_port(name: str, service: dict[str, Any]) -> int:
    """The port a service listens on inside its container, from its own command line."""
    command = service.get("command", [])
    if "build" in service:
        from wattson.cli import build_parser

        address = build_parser().parse_args(command).listen_address
        return int(address.rsplit(":", 1)[1]) if address else wattson_default_port()
    flags = [a.split("=", 1)[1] for a in command if a.startswith("--web.listen-address=")]
    if flags:
        return int(flags[0].rsplit(":", 1)[1])
    if service["image"].startswith("grafana/"):
        return int(service.get("environment", {}).get("GF_SERVER_HTTP_PORT", GRAFANA_DEFAULT_PORT))
    raise AssertionError(f"{name}: cannot tell which port it listens on")


# --- compose -----------------------------------------------------------------------------------------

def test_named_volumes_and_dependencies_resolve() -> None:
    """Every named volume a service mounts is declared (and every declared one used); every dependency
    is a service that runs in every profile (one in a profile would not start without it)."""
    doc = compose()
    mounts = [v for s in doc["services"].values() for v in s.get("volumes", [])]
    used = {v.split(":")[0] for v in mounts if isinstance(v, str)}
    used |= {v["source"] for v in mounts if isinstance(v, dict) and v.get("type") == "volume"}
    assert used == set(doc["volumes"]), (sorted(used), sorted(doc["volumes"]))
    for name, s in doc["services"].items():
        for dep in s.get("depends_on", {}):
            assert dep in doc["services"], f"{name}: depends on unknown service {dep}"
            assert "profiles" not in doc["services"][dep], f"{name}: depends on {dep}, which only runs in a profile"


@pytest.mark.parametrize("service", sorted(services()))
def test_service_is_hardened_and_healthchecked(service: str) -> None:
    s = services()[service]
    assert s["read_only"] is True, f"{service}: read_only"
    assert s["cap_drop"] == ["ALL"], f"{service}: cap_drop"
    assert "no-new-privileges:true" in s["security_opt"], f"{service}: no-new-privileges"
    assert "cap_add" not in s and "privileged" not in s, f"{service}: extra privileges"
    hc = s["healthcheck"]
    assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] >= 3, f"{service}: healthcheck"


@pytest.mark.parametrize("service", sorted(services()))
def test_ports_publish_what_the_service_listens_on_and_bind_to_localhost_by_default(service: str) -> None:
    """Published ports land on the port the service really listens on (and its healthcheck asks), on
    127.0.0.1 unless BIND_ADDRESS says otherwise."""
    s = services()[service]
    port = listen_port(service, s)
    for spec in s["ports"]:
        host_ip, _host_port, container_port = interpolate(spec, {}).rsplit(":", 2)
        assert host_ip == "127.0.0.1", f"{service}: {spec} publishes on {host_ip} by default"
        assert interpolate(spec, {"BIND_ADDRESS": "0.0.0.0"}).startswith("0.0.0.0:"), spec
        assert int(container_port) == port, f"{service}: publishes {container_port}, listens on {port}"
    urls = [u for arg in s["healthcheck"]["test"] for u in re.findall(r"https?://[^\s'\"]+", arg)]
    assert urls and all(urlsplit(u).port == port for u in urls), f"{service}: healthcheck {urls} vs port {port}"


def test_images_are_pinned_to_release_tags() -> None:
    """Third-party images at a release; the wattson image tagged, by default, with the package version."""
    for name, s in services().items():
        repo, _, tag = interpolate(s["image"], {}).rpartition(":")
        assert repo and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {s['image']} is not pinned to a release"
    images = {interpolate(s["image"], {}) for s in wattson_services().values()}
    assert len(images) == 1, f"the wattson variants must share one image: {images}"
    assert images.pop().rpartition(":")[2] == pyproject()["project"]["version"]


def test_config_mounts_are_read_only_and_exist() -> None:
    env = env_example()
    for name, s in services().items():
        for volume in s.get("volumes", []):
            if isinstance(volume, str) or volume["type"] == "volume":
                continue  # a named volume: test_named_volumes_and_dependencies_resolve
            assert volume["type"] == "bind" and volume["read_only"] is True, f"{name}: {volume}"
            source = ROOT / interpolate(volume["source"], env)
            assert source.exists(), f"{name}: mount source {source} does not exist"


def test_grafana_mounts_match_provisioning_and_home_dashboard() -> None:
    g = services()["grafana"]
    targets = {v["target"]: v["source"] for v in g["volumes"] if isinstance(v, dict)}
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/wattson.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert (ROOT / targets[provider["options"]["path"]]).resolve() == (ROOT / "grafana/dashboards").resolve()
    assert (ROOT / targets["/etc/grafana/provisioning"]).resolve() == (ROOT / "grafana/provisioning").resolve()
    home = Path(g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    mount = next(t for t in targets if home.is_relative_to(t))
    assert (ROOT / targets[mount] / home.relative_to(mount)).exists(), f"home dashboard {home} is not mounted"


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
    profiles = {p for s in services().values() for p in s.get("profiles", [])}
    chosen = set(env["COMPOSE_PROFILES"].split(","))
    assert chosen and chosen <= profiles, f".env.example selects {chosen}; compose has profiles {profiles}"


def mounted_config(service: dict[str, Any], target: str) -> Path:
    """The repository file a service mounts at `target`, with .env.example's settings."""
    (source,) = [v["source"] for v in service["volumes"] if isinstance(v, dict) and v["target"] == target]
    return ROOT / interpolate(source, env_example())


def test_wattson_commands_parse_with_the_real_cli_and_read_the_mounted_config() -> None:
    """Each variant's command is accepted by wattson's own argument parser; the config file it names is
    the one mounted; exactly the variants without a GPU reservation simulate, except a grid hub, whose
    mounted config has no GPUs at all (gpu.backend: none)."""
    from wattson.cli import build_parser
    from wattson.config import parse_config

    variants = wattson_services()
    assert variants
    for name, s in variants.items():
        args = build_parser().parse_args(s["command"])
        mounted = {v["target"] for v in s["volumes"] if isinstance(v, dict)}
        assert args.config_file in mounted, f"{name}: --config.file {args.config_file} is not mounted ({mounted})"
        reserves_gpus = "deploy" in s
        path = mounted_config(s, args.config_file)
        if parse_config(path.read_text(), str(path)).gpu.backend == "none":
            assert not args.simulate and not reserves_gpus, f"{name}: a grid hub neither simulates nor uses GPUs"
        else:
            assert args.simulate != reserves_gpus, f"{name}: simulate={args.simulate}, reserves GPUs={reserves_gpus}"
        assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert "/tmp" in s["tmpfs"], f"{name}: read-only root needs a writable /tmp"
        assert s.get("profiles"), f"{name}: the variants are chosen by profile"
    gpu = [s for s in variants.values() if "deploy" in s]
    (device,) = gpu[0]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_prometheus_keeps_a_month_of_data_and_targets_wattson_in_the_stack() -> None:
    """Month-to-date sums need 32 days of data; the file_sd targets reach a wattson variant (by service
    name or network alias) on the port it listens on."""
    p = services()["prometheus"]
    retention = [a for a in p["command"] if a.startswith("--storage.tsdb.retention.time=")]
    value = interpolate(retention[0].split("=", 1)[1], env_example())
    m = re.fullmatch(r"(\d+)d", value)
    assert m and int(m.group(1)) >= 32, f"retention {value} is shorter than a month"
    names = {}
    for name, s in wattson_services().items():
        names[name] = s
        for alias in (s.get("networks") or {}).get("default", {}).get("aliases", []):
            names[alias] = s
    entries = yaml.safe_load((ROOT / "prometheus/targets/wattson.yml").read_text())
    targets = [t for entry in entries for t in entry["targets"]]
    assert targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in names, f"target {target}: {host} is no wattson service or alias ({sorted(names)})"
        assert int(port) == listen_port(host, names[host]), target


# --- Dockerfile --------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, args = pending.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == name]


def pyproject() -> dict[str, Any]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def test_entrypoint_is_the_packages_console_script() -> None:
    """The image runs the command pip installs for the package, and that command resolves to a callable."""
    (entrypoint,) = instructions("ENTRYPOINT")
    command = json.loads(entrypoint)
    scripts = pyproject()["project"]["scripts"]
    assert command[0] in scripts, f"ENTRYPOINT {command} is not a console script of the package ({scripts})"
    module, _, func = scripts[command[0]].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_image_runs_as_the_unprivileged_user_it_creates() -> None:
    users = instructions("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0"), users[-1]
    runs = " ".join(instructions("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs), f"USER {uid} is not the user the image creates"
    if gid:
        assert re.search(rf"groupadd\b[^&]*--gid {gid}\b", runs), f"group {gid} is not the group the image creates"
    assert "setcap" not in runs and "chmod u+s" not in runs


def test_python_base_image_is_pinned_and_satisfies_requires_python() -> None:
    spec = pyproject()["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+(?:\.\d+)*)", spec).group(1).split("."))  # type: ignore[union-attr]
    for image in (args.split()[0] for args in instructions("FROM")):
        m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(?:-\w+)?", image)
        assert m, f"FROM {image}: not a pinned python slim image"
        assert tuple(int(x) for x in m.groups()) >= minimum, f"FROM {image} is older than requires-python {spec}"


def test_exposed_port_and_healthcheck_url_are_wattsons_default() -> None:
    port = wattson_default_port()
    assert instructions("EXPOSE") == [str(port)]
    env = dict(kv.split("=", 1) for args in instructions("ENV") for kv in shlex.split(args))
    url = urlsplit(env["WATTSON_HEALTHCHECK_URL"])
    assert url.port == port and url.path == "/healthz", env["WATTSON_HEALTHCHECK_URL"]


def healthcheck_command() -> list[str]:
    (args,) = instructions("HEALTHCHECK")
    assert " CMD " in f" {args} ", args
    command = json.loads(args.split(" CMD ", 1)[1])
    assert command[0] == "python", command  # the image's interpreter; here, ours
    return [sys.executable, *command[1:]]


@pytest.mark.integration
def test_healthchecks_pass_against_a_running_daemon_and_fail_without_one(tmp_path: Path) -> None:
    """The image's HEALTHCHECK and the compose healthcheck of each wattson variant, run for real: exit 0
    against a serving daemon, non-zero when nothing listens."""
    image_check = healthcheck_command()
    compose_checks = {}
    for name, s in wattson_services().items():
        assert s["healthcheck"]["test"][:2] == ["CMD", "python"], s["healthcheck"]["test"]
        compose_checks[name] = [sys.executable, *s["healthcheck"]["test"][2:]]
    default = f"http://127.0.0.1:{wattson_default_port()}"

    def run(cmd: list[str], base: str) -> int:
        cmd = [arg.replace(default, base) for arg in cmd]
        env = {"WATTSON_HEALTHCHECK_URL": f"{base}/healthz"}
        return subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode

    with run_wattson(tmp_path, None, "--simulate") as d:
        assert run(image_check, d.base) == 0
        for name, cmd in compose_checks.items():
            assert run(cmd, d.base) == 0, name
    nobody = f"http://127.0.0.1:{free_port()}"
    assert run(image_check, nobody) != 0
    for name, cmd in compose_checks.items():
        assert run(cmd, nobody) != 0, name


def dockerignore_includes(path: str) -> bool:
    """Whether the build context keeps `path`: the last matching pattern decides, `!` re-includes, and a
    pattern matching a directory covers what is inside it (Docker's rules)."""
    keep = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            keep = negate
    return keep


def test_build_context_holds_what_the_build_needs_and_no_secrets() -> None:
    """Everything the build stage COPYs and `pip wheel .` reads is in the context; .env (API keys, the
    Grafana password), the tests and git history are not."""
    setuptools = pyproject()["tool"]["setuptools"]
    needed = ["pyproject.toml", pyproject()["project"]["readme"], f"{setuptools['package-dir']['']}/wattson/cli.py"]
    for args in instructions("COPY"):
        if args.startswith("--from"):
            continue
        needed.extend(shlex.split(args)[:-1])
    for path in needed:
        assert dockerignore_includes(path.strip("./") or path), f"{path} is excluded from the build context"
    for path in (".env", "tests/test_compose.py", ".git/config", "exporter/wattson/__pycache__/cli.cpython-312.pyc"):
        assert not dockerignore_includes(path), f"{path} would be sent to the Docker daemon"


# --- schema ------------------------------------------------------------------------------------------

def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
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
