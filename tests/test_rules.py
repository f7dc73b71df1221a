"""Checks of the shipped Prometheus and Alertmanager configuration, the rules and their promtool tests.

The static checks (names, labels, annotations, test coverage, what each rule reads, wiring) run
everywhere; the ones marked `integration` run promtool, amtool and Prometheus, which `.ci/run` installs
from Debian (Prometheus 2). Where a Prometheus 3 promtool is also there ($WATTSON_PROMTOOL3, or
`promtool3` on PATH), every promtool check and test runs under both. Without the Debian tools those
tests are skipped, except under CI=true, where they fail (tests.conftest.require_tool).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import find_tool, require_tool
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
FLEET_DOC = ROOT / "docs" / "fleet.md"
PROMTOOL_TIMEOUT_SECONDS = 240
Completed = subprocess.CompletedProcess[str]
# The budget and threshold rules: one value per scope, deduplicated over the wattsons that export it.
BUDGET_RULES = ("scope:wattson_budget_cost:max", "scope:wattson_budget_co2e_grams:max",
                "scope:wattson_carbon_intensity_threshold_grams_per_kwh:max")
RAW_BUDGETS = ("wattson_budget_cost", "wattson_budget_co2e_grams", "wattson_carbon_intensity_threshold_grams_per_kwh")
SCOPE_KEYS = {"scope", "cluster", "job", "instance", "namespace", "account", "user"}
# What one rule evaluation may read per input series (at a 15 s scrape interval), and the longest range.
MAX_SAMPLES_PER_SERIES = 4000
SCRAPE_INTERVAL_SECONDS = 15
MAX_RANGE_SECONDS = 6 * 3600
PERIOD_HELPERS = ("instance:wattson_period_start_timestamp_seconds:current",
                  "instance:wattson_period_end_timestamp_seconds:current")


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


# The labels that name a scope, for a budget selector that admits only some scopes.
PINNED_SCOPE_KEYS = {'scope="instance"': {"cluster", "job", "instance"}, 'scope="cluster"': {"cluster"},
                     'scope="fleet"': set(), 'scope=~"namespace|account|user"': {"namespace", "account", "user"}}
BUDGET_JOIN = re.compile(r"on \(([^)]*)\)\s*group_left \([^)]*\)\s*(scope:wattson_[a-z0-9_]+:max)(\{[^}]*\})?")


def test_budget_alerts_compare_each_scope_with_its_own_deduplicated_budget() -> None:
    """Alerts read budgets only through the scope:...:max rules (several wattsons may export the same
    budget), and join each comparison on every label that names a scope (on that scope's own labels where
    the selector admits one scope only), and money on currency: a host's spend is never compared with
    another host's budget, nor a namespace's with an account's."""
    compared = set()
    for rule in alert_rules():
        expr = rule["expr"]
        for raw in RAW_BUDGETS:
            assert not re.search(rf"(?<![a-z0-9_:]){raw}(?![a-z0-9_:])", expr), \
                f"{ALERTS}: {rule['alert']}: reads {raw} directly"
        for m in BUDGET_JOIN.finditer(expr):
            labels = {x.strip() for x in m.group(1).split(",") if x.strip()}
            selector = m.group(3) or ""
            needed = next((keys for pin, keys in PINNED_SCOPE_KEYS.items() if pin in selector), SCOPE_KEYS)
            assert needed <= labels, f"{ALERTS}: {rule['alert']}: on ({m.group(1)}) for {m.group(2)}{selector}"
            if m.group(2) == "scope:wattson_budget_cost:max":
                assert "currency" in labels, f"{ALERTS}: {rule['alert']}: on ({m.group(1)}) lacks currency"
            compared.add(m.group(2))
    assert compared == set(BUDGET_RULES), f"{ALERTS}: budget rules compared: {sorted(compared)}"


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


def _range_seconds(text: str) -> int:
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in re.findall(r"(\d+)([smhd])", text))


def test_no_rule_reads_its_own_output_or_a_month_of_samples() -> None:
    """The period totals come from wattson's gauges: no rule reads its own earlier output (which drifts or
    double counts on rulers that evaluate late, twice or with an offset), no rule sums a month of samples,
    and what one evaluation reads per input series stays within 4,000 samples at a 15 s scrape interval."""
    for path in RECORDING_FILES:
        for rule in rules_of(path):
            name, expr = rule["record"], rule["expr"]
            assert not re.search(re.escape(name) + r"(?![a-z0-9_:])", expr), f"{path.name}: {name} reads itself"
            assert "timestamp(" not in expr and "sum_over_time" not in expr, f"{path.name}: {name}"
            per_series: dict[str, int] = {}
            for metric, rng in re.findall(r"([a-z_:][a-z0-9_:]*)(?:\{[^}]*\})?\[([0-9smhd]+)\]", expr):
                seconds = _range_seconds(rng)
                assert seconds <= MAX_RANGE_SECONDS, f"{path.name}: {name}: a range of {rng}"
                per_series[metric] = per_series.get(metric, 0) + seconds // SCRAPE_INTERVAL_SECONDS
            for metric, samples in per_series.items():
                assert samples <= MAX_SAMPLES_PER_SERIES, f"{path.name}: {name}: {samples} samples of {metric}"


def test_period_totals_read_only_wattsons_series_and_the_period_helpers() -> None:
    """Today and month to date come from raw series in one step (plus the current-period helpers, whose
    staleness can only leave a total out, see wattson-recording.yml), so every ruler computes the same."""
    group = next(g for g in load(RECORDING)["groups"] if g["name"] == "wattson.periods")
    for rule in group["rules"]:
        read = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]))
        allowed = set(PERIOD_HELPERS) - {rule["record"]}
        assert read <= allowed, f"wattson.periods: {rule['record']} reads {sorted(read - allowed)}"


REGEX_MATCHER = re.compile(r'[=!]~\s*"([^"]*)"')
LAST_STRING_ARGUMENT = re.compile(r'"([^"]*)"\s*\)')


def test_no_regex_in_the_rules_depends_on_what_dot_matches() -> None:
    """Prometheus 3 lets `.` match a newline; Prometheus 2 does not. A regex in the rules either has no
    `.` or says what it means with (?s:...), so both read it alike."""
    for path in (*RECORDING_FILES, ALERTS):
        for rule in rules_of(path):
            name = rule.get("record") or rule.get("alert")
            for rx in REGEX_MATCHER.findall(rule["expr"]):
                assert "." not in rx, f"{path.name}: {name}: matcher regex {rx!r}"
            for rx in LAST_STRING_ARGUMENT.findall(rule["expr"]):  # label_replace's regex
                assert "." not in rx or rx.startswith("(?s:"), f"{path.name}: {name}: label_replace regex {rx!r}"


# --- promtool / amtool -----------------------------------------------------------------------------

def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_SECONDS, cwd=ROOT)


@pytest.mark.integration
def test_promtool_check_config() -> None:
    require_tool("promtool")
    for name, path in promtools().items():
        res = _run([path, "check", "config", str(PROM / "prometheus.yml")])
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


@pytest.mark.integration
def test_promtool_check_rules() -> None:
    require_tool("promtool")
    for name, path in promtools().items():
        res = _run([path, "check", "rules", *map(str, shipped_rule_files())])
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def _major_version(tool: str) -> int | None:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+)\.", out.stdout + out.stderr)
    return int(m.group(1)) if m else None


@functools.cache
def promtools() -> dict[str, str]:
    """The promtools to run the tests with: Debian's (Prometheus 2) and, when one is there, a Prometheus 3
    promtool: $WATTSON_PROMTOOL3 or `promtool3` on PATH. The rules must give the same answers under both."""
    found = {}
    path = find_tool("promtool")
    if path:
        found[f"promtool{_major_version(path) or ''}"] = path
    three = os.environ.get("WATTSON_PROMTOOL3") or shutil.which("promtool3")
    if three and _major_version(three) == 3:
        found["promtool3"] = three
    return found


@pytest.fixture(scope="module")
def promtool_test_results() -> dict[tuple[str, Path], Completed]:
    """Run every promtool test file with every promtool at once: the long files take most of the time."""
    require_tool("promtool")
    jobs = [(name, p) for name in promtools() for p in TEST_FILES]
    with ThreadPoolExecutor(max_workers=len(TEST_FILES)) as pool:
        futures = {(name, p): pool.submit(_run, [promtools()[name], "test", "rules", str(p)]) for name, p in jobs}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.integration
@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path, promtool_test_results: dict[tuple[str, Path], Completed]) -> None:
    for (name, path), res in promtool_test_results.items():
        if path == test_file:
            assert res.returncode == 0, f"{name} test rules {test_file.name}:\n{res.stdout}{res.stderr}"


# A day-boundary check small enough to run twice: a is up across midnight, b's last sample (23:50) is of
# the day before. At 00:03 today's fleet energy is a's 3 minutes only.
DAY_BOUNDARY_TEST = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: wattson_period_start_timestamp_seconds{job="wattson",instance="a:9874",period="day",offset="+00:00"}
        values: 0x1439 86400x10
      - series: wattson_period_energy_joules{job="wattson",instance="a:9874",period="day",offset="+00:00"}
        values: 0+1000x1439 0+1000x10
      - series: wattson_period_start_timestamp_seconds{job="wattson",instance="b:9874",period="day",offset="+00:00"}
        values: 0x1430
      - series: wattson_period_energy_joules{job="wattson",instance="b:9874",period="day",offset="+00:00"}
        values: 0+500x1430
    promql_expr_test:
      - expr: fleet:wattson_gpu_energy_joules:today
        eval_time: 1d3m
        exp_samples:
          - labels: 'fleet:wattson_gpu_energy_joules:today{offset="+00:00"}'
            value: 3000
"""
CURRENT_PERIOD = "(instance:wattson_period_end_timestamp_seconds:current > time())"


@pytest.mark.integration
def test_promtool_catches_a_today_that_counts_yesterday(tmp_path: Path) -> None:
    """The day-boundary check is not vacuous: it passes with the shipped rules and fails when the totals
    forget to keep only the current period (a host down across midnight would add yesterday's total)."""
    promtool = require_tool("promtool")
    rules = RECORDING.read_text()
    broken = rules.replace(CURRENT_PERIOD, "last_over_time(wattson_period_start_timestamp_seconds[15m])")
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
    assert "fleet:wattson_gpu_energy_joules:today" in results["broken"].stdout + results["broken"].stderr


def remote_write_example() -> str:
    """The Prometheus config that docs/fleet.md shows for sending to a central store."""
    blocks = re.findall(r"```yaml\n(.*?)```", FLEET_DOC.read_text(), re.DOTALL)
    found = [b for b in blocks if "remote_write:" in b]
    assert len(found) == 1, f"{FLEET_DOC}: expected one yaml block with remote_write, found {len(found)}"
    return found[0]


def test_remote_write_example_keeps_what_the_rules_need() -> None:
    """Sent to a central store, the series keep their instance and job labels and gain a cluster label,
    and wattson's series are not dropped by the example's relabelling."""
    cfg = yaml.safe_load(remote_write_example())
    assert cfg["global"]["external_labels"].get("cluster"), "external_labels: cluster"
    for rw in cfg["remote_write"]:
        for relabel in rw.get("write_relabel_configs", []):
            assert relabel.get("action") != "labeldrop" or not re.fullmatch(relabel["regex"], "instance")


@pytest.mark.integration
def test_promtool_accepts_the_remote_write_example(tmp_path: Path) -> None:
    require_tool("promtool")
    config = tmp_path / "prometheus.yml"
    config.write_text(remote_write_example())
    for name, path in promtools().items():
        res = _run([path, "check", "config", str(config)])
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


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
        # Without wattson's period totals there is no current period, and nothing to total.
        assert query(prom.base, "instance:wattson_period_end_timestamp_seconds:current") == []
        assert query(prom.base, "scope:wattson_gpu_net_cost:today") == []
