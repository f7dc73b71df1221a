"""Checks of the shipped Prometheus and Alertmanager configuration, the rules and their promtool tests.

The static checks (names, labels, annotations, test coverage, wiring) run everywhere; the ones marked
`integration` run promtool, amtool and Prometheus, which `.ci/run` installs from Debian. Without them
those tests are skipped, except under CI=true, where they fail (tests.conftest.require_tool).
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.promstack import (
    alerts,
    free_port,
    query,
    rules,
    shipped_rule_files,
    start_prometheus,
    targets,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "prometheus"
RECORDING = PROM / "rules" / "wattson-recording.yml"
ALERTS = PROM / "rules" / "wattson-alerts.yml"
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning", "info"}
# level:metric:operation, the level naming the labels kept (instance, fleet, global, instance_kind_workload...)
RECORD_NAME = re.compile(r"^(fleet|global|[a-z]+(_[a-z]+)*):wattson_[a-z0-9_]+:[a-z0-9_]+$")
RECORDING_FILES = sorted(p for p in (PROM / "rules").glob("*.yml") if p != ALERTS)
PROMTOOL_TIMEOUT_SECONDS = 240
Completed = subprocess.CompletedProcess[str]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules_of(path: Path) -> Iterator[dict[str, Any]]:
    for group in load(path)["groups"]:
        yield from group["rules"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules_of(ALERTS) if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for path in RECORDING_FILES for r in rules_of(path) if "record" in r]


def test_recording_rules_follow_level_metric_operation() -> None:
    names = [r["record"] for r in recording_rules()]
    assert names, f"{RECORDING}: no recording rules"
    bad = [n for n in names if not RECORD_NAME.match(n)]
    assert not bad, f"{RECORDING}: names not in level:metric:operation form: {bad}"
    assert len(names) == len(set(names)), f"{RECORDING}: duplicate record names"


def test_alert_file_holds_only_alerts_and_recording_file_only_recordings() -> None:
    assert all("alert" in r for r in rules_of(ALERTS)), f"{ALERTS}: holds a recording rule"
    assert all("record" in r for r in rules_of(RECORDING)), f"{RECORDING}: holds an alert"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_and_description(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{ALERTS}: {name}: labels.severity"
    annotations = rule.get("annotations", {})
    for key in ("summary", "description"):
        assert str(annotations.get(key, "")).strip(), f"{ALERTS}: {name}: annotations.{key} missing"
    assert name.startswith("Wattson"), f"{ALERTS}: {name}: alert names start with Wattson"


def test_budget_and_threshold_alerts_compare_each_host_with_its_own_numbers() -> None:
    """A budget is exported by each wattson: joining on anything less than job and instance would
    compare one host's spend with another's budget; money must also match on currency."""
    for rule in alert_rules():
        expr = rule["expr"]
        for metric in ("wattson_budget_cost", "wattson_budget_co2e_grams",
                       "wattson_carbon_intensity_threshold_grams_per_kwh"):
            if metric not in expr:
                continue
            joins = re.findall(r"on \(([^)]*)\)", expr)
            assert joins, f"{ALERTS}: {rule['alert']}: compares with {metric} without on (...)"
            for join in joins:
                labels = {x.strip() for x in join.split(",") if x.strip()}
                if not labels:  # on () joins with the calendar helpers only
                    continue
                assert {"job", "instance"} <= labels, f"{ALERTS}: {rule['alert']}: on ({join})"
                if metric == "wattson_budget_cost":
                    assert "currency" in labels, f"{ALERTS}: {rule['alert']}: on ({join}) lacks currency"


@functools.cache
def _alert_tests() -> list[dict[str, Any]]:
    out = []
    for path in TEST_FILES:
        for group in load(path).get("tests", []):
            out.extend(group.get("alert_rule_test", []))
    return out


@functools.cache
def _promql_tests() -> list[str]:
    out = []
    for path in TEST_FILES:
        for group in load(path).get("tests", []):
            out.extend(t["expr"] for t in group.get("promql_expr_test", []))
    return out


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_is_tested_firing_and_silent(rule: dict[str, Any]) -> None:
    cases = [t for t in _alert_tests() if t["alertname"] == rule["alert"]]
    assert any(t.get("exp_alerts") for t in cases), f"{rule['alert']}: no promtool test where it fires"
    assert any(not t.get("exp_alerts") for t in cases), f"{rule['alert']}: no promtool test where it is silent"


def test_every_recording_rule_is_checked_by_a_promql_test() -> None:
    exprs = _promql_tests()
    unchecked = [r["record"] for r in recording_rules()
                 if not any(re.search(re.escape(r["record"]) + r"(?![a-z0-9_:])", e) for e in exprs)]
    assert not unchecked, f"recording rules without a promql_expr_test in prometheus/tests: {unchecked}"


def test_test_files_load_the_shipped_rules() -> None:
    for path in TEST_FILES:
        files = load(path)["rule_files"]
        resolved = {(path.parent / f).resolve() for f in files}
        shipped = {p.resolve() for p in RECORDING_FILES} | {ALERTS.resolve()}
        assert resolved & shipped, f"{path}: rule_files must include a shipped rule file"
        for f in resolved:
            assert f.exists(), f"{path}: rule file {f} does not exist"


def test_prometheus_yml_scrapes_wattson_and_itself_with_the_shipped_rules() -> None:
    """Every shipped rule file is loaded; the wattson job's file_sd targets exist and sit on wattson's
    default port; alerts go to a service of the compose stack on the port it listens on."""
    from wattson.config import WebConfig, parse_listen_address

    cfg = load(PROM / "prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) >= {"wattson", "prometheus"}, f"prometheus.yml: jobs {sorted(jobs)}"
    rule_files = [(PROM / f).resolve() for f in cfg["rule_files"]]
    shipped = sorted(p.resolve() for p in (PROM / "rules").glob("*.yml"))
    assert sorted(rule_files) == shipped, f"prometheus.yml: rule_files {cfg['rule_files']}"
    sd_files = [f for sd in jobs["wattson"]["file_sd_configs"] for f in sd["files"]]
    matched = [p for pattern in sd_files for p in PROM.glob(pattern)]
    assert matched, f"prometheus.yml: file_sd patterns {sd_files} match no file under prometheus/"
    port = parse_listen_address(WebConfig().listen_address)[1]
    targets = [t for p in matched for entry in load(p) for t in entry["targets"]]
    assert targets and all(t.endswith(f":{port}") for t in targets), f"file_sd targets not on port {port}: {targets}"
    services = load(ROOT / "docker-compose.yml")["services"]
    for am in (t for a in cfg["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]):
        host, am_port = am.rsplit(":", 1)
        assert host in services, f"prometheus.yml: alertmanager {am} is not a compose service"
        listen = [a.split("=", 1)[1] for a in services[host]["command"] if a.startswith("--web.listen-address=")]
        assert listen and listen[0].rsplit(":", 1)[1] == am_port, f"{am}: {host} listens on {listen}"


def test_accounting_group_interval_is_below_the_lookback() -> None:
    """The increments measure the time since their own previous sample, which Prometheus only
    finds within its 5m lookback."""
    for group in load(RECORDING)["groups"]:
        interval = group.get("interval", "15s")
        m = re.fullmatch(r"(\d+)([smh])", interval)
        assert m, f"{RECORDING}: group {group['name']}: interval {interval!r}"
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
        assert seconds < 300, f"{RECORDING}: group {group['name']}: interval {interval} is not below 5m"


# --- promtool / amtool -----------------------------------------------------------------------------

def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_SECONDS, cwd=ROOT)


@pytest.mark.integration
def test_promtool_check_config() -> None:
    res = _run([require_tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.integration
def test_promtool_check_rules() -> None:
    res = _run([require_tool("promtool"), "check", "rules", *map(str, shipped_rule_files())])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def promtool_test_results() -> dict[Path, Completed]:
    """Run every promtool test file at once: the month-boundary file alone takes most of the time."""
    promtool = require_tool("promtool")
    with ThreadPoolExecutor(max_workers=len(TEST_FILES)) as pool:
        futures = {p: pool.submit(_run, [promtool, "test", "rules", str(p)]) for p in TEST_FILES}
        return {p: f.result() for p, f in futures.items()}


@pytest.mark.integration
@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path, promtool_test_results: dict[Path, Completed]) -> None:
    res = promtool_test_results[test_file]
    assert res.returncode == 0, f"promtool test rules {test_file.name}:\n{res.stdout}{res.stderr}"


# A day-boundary check small enough to run twice: 0.001 EUR/s sampled and evaluated every 4m, so
# every increment is 0.24 EUR; at 00:08 on day 2 "today" holds the increments recorded at 00:00,
# 00:04 and 00:08.
DAY_BOUNDARY_TEST = """
rule_files: [rules.yml]
evaluation_interval: 4m
tests:
  - interval: 4m
    input_series:
      - series: wattson_gpu_cost_total{job="wattson",instance="a:9874",gpu="0",uuid="GPU-a0",currency="EUR"}
        values: 0+0.24x400
    promql_expr_test:
      - expr: abs(instance:wattson_gpu_net_cost:today / 0.72 - 1) < bool 1e-9
        eval_time: 1d8m
        exp_samples:
          - labels: '{job="wattson",instance="a:9874",currency="EUR"}'
            value: 1
"""


@pytest.mark.integration
def test_promtool_catches_a_today_that_ignores_midnight(tmp_path: Path) -> None:
    """The day-boundary check is not vacuous: it passes with the shipped rules and fails when
    "today" forgets to keep only the current UTC date."""
    promtool = require_tool("promtool")
    rules = RECORDING.read_text()
    broken = rules.replace("and on (utc_date) global:wattson_utc_period:info", "")
    assert broken != rules
    cases = {}
    for name, text in (("shipped", rules), ("broken", broken)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rules.yml").write_text(text)
        (tmp_path / name / "test.yml").write_text(DAY_BOUNDARY_TEST)
        cases[name] = tmp_path / name / "test.yml"
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, [promtool, "test", "rules", str(p)]) for name, p in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    assert results["shipped"].returncode == 0, results["shipped"].stdout + results["shipped"].stderr
    assert results["broken"].returncode != 0, results["broken"].stdout
    assert "instance:wattson_gpu_net_cost:today" in results["broken"].stdout + results["broken"].stderr


@pytest.mark.integration
def test_amtool_check_config() -> None:
    res = _run([require_tool("amtool"), "check-config", str(PROM / "alertmanager.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.integration
def test_shipped_rules_load_in_a_real_prometheus_with_wattson_down(tmp_path: Path) -> None:
    """Every group loads and evaluates with health "ok" even with no wattson data at all, the
    wattson target shows as down, and the shipped alerts are all there."""
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    with start_prometheus(tmp_path, wattson_target=nobody, scrape_interval="1s", alert_for="0s") as prom:
        def evaluated() -> list[dict[str, Any]]:
            groups = rules(prom.base)
            done = all(r["health"] != "unknown" for g in groups for r in g["rules"])
            return groups if groups and done else []

        groups = wait_for("every rule evaluated once", evaluated, timeout=30)
        assert {g["name"] for g in groups} == {g["name"] for p in (*RECORDING_FILES, ALERTS) for g in load(p)["groups"]}
        bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not bad, f"rules not healthy: {bad}"
        assert all(g["interval"] == 1 for g in groups), [(g["name"], g["interval"]) for g in groups]
        loaded_alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
        assert loaded_alerts == {r["alert"] for r in alert_rules()}
        up = wait_for('up{job="wattson"}', lambda: query(prom.base, 'up{job="wattson"}'), timeout=30)
        assert [s["metric"]["instance"] for s in up] == [nobody] and up[0]["value"][1] == "0"
        def scraped() -> dict[str, str]:
            jobs = {t["labels"]["job"]: t["health"] for t in targets(prom.base)}
            return jobs if "unknown" not in jobs.values() else {}

        jobs = wait_for("both targets scraped", scraped, timeout=30)
        assert jobs == {"wattson": "down", "prometheus": "up"}, jobs
        # With `for` shortened to 0s the down target fires WattsonDown at once and, once the first
        # scrape has put up{job="wattson"} there, nothing else (WattsonAbsent may flash before it).
        def firing() -> set[tuple[str, str | None]]:
            return {(a["labels"]["alertname"], a["labels"].get("instance")) for a in alerts(prom.base)
                    if a["state"] == "firing"}

        wait_for("only WattsonDown firing", lambda: firing() == {("WattsonDown", nobody)}, timeout=30)
        # The calendar helper needs no data at all.
        period = query(prom.base, "global:wattson_utc_period:info")
        assert len(period) == 1 and set(period[0]["metric"]) >= {"utc_date", "utc_month"}
