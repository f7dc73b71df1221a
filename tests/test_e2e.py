"""End to end: simulated wattson scraped by a real Prometheus with the shipped config and rules.

Proves that every rule group loads and evaluates, that every PromQL expression of every dashboard
panel returns data and every dashboard variable lists the host, its GPUs and its day boundaries, that
today and month to date from the rules are exactly wattson's own period totals (and, for a fresh
wattson, its counters), that budget alerts of several scopes are driven to firing through wattson's own
configuration, and that per-workload totals add up to the GPU totals through the Prometheus API.
(promtool's static checks of the same files are in tests/test_rules.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.daemon import run_wattson
from tests.promstack import alerts, dashboard_generator, query, rules, start_prometheus, wait_for

CLUSTER = "e2e"  # the target label Prometheus gives the wattson target, as file_sd's `labels` would

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent

# Budgets tiny enough to be exceeded within seconds, the host's own and those of wider scopes (the fleet,
# the cluster the scrape labels it with, the namespace of the pod below); intensity over its threshold
# while GPUs draw power. Days and months are totalled in UTC and at +02:00.
CONFIG = """
sampler: {interval_seconds: 0.5}
gpu:
  backend: simulated
  simulated:
    count: 4
    profiles: [training, training, training, idle]
    jobs:   # two concurrent jobs on GPU 0, one job across GPUs 1 and 2, GPU 3 idle
      - {kind: slurm_job, id: "4242", gpus: [0], user: alice, uid: 1001, load: 1.0}
      - {kind: pod, id: 6f1c2b3a-4d5e-4f60-8a9b-0c1d2e3f4a5b, gpus: [0], pod_name: inference-7d9f-abcde,
         namespace: serving, user: svc, uid: 1500, load: 0.5}
      - {kind: slurm_job, id: "4243", gpus: [1, 2], user: bob, uid: 1002}
grid:
  pue: 1.2
  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}
  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.30, currency: EUR}]}
budgets:
  currency: EUR
  period_utc_offset: "+02:00"
  cost_per_day: 0.000001
  cost_per_month: 0.000001
  co2e_grams_per_day: 0.001
  co2e_grams_per_month: 0.001
  carbon_intensity_threshold_grams_per_kwh: 100
  scopes:
    - {scope: fleet, cost_per_day: 0.000001, cost_per_month: 0.000001, co2e_grams_per_month: 0.001}
    - {scope: cluster, cluster: e2e, cost_per_day: 0.000001, cost_per_month: 0.000001, co2e_grams_per_month: 0.001}
    - {scope: namespace, namespace: serving, cost_per_day: 0.000001, cost_per_month: 0.000001,
       co2e_grams_per_month: 0.001}
workloads: {enabled: true}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """wattson and a Prometheus scraping it (skipped without prometheus, failed under CI=true)."""
    tmp = tmp_path_factory.mktemp("e2e")
    with run_wattson(tmp, CONFIG) as wattson, \
            start_prometheus(tmp, f"127.0.0.1:{wattson.port}", alert_for="0s",
                             target_labels={"cluster": CLUSTER}) as prom:
        target = f"127.0.0.1:{wattson.port}"
        # several scrapes and rule evaluations before anything is asserted
        wait_for("8 scrapes of wattson",
                 lambda: query(prom.base, f'count_over_time(up{{instance="{target}"}}[1m]) >= 8'), timeout=60)
        wait_for("every rule evaluated and healthy",
                 lambda: all(r.get("lastEvaluation", "").startswith("20") and r["health"] == "ok"
                             for g in rules(prom.base) for r in g["rules"]), timeout=30)
        yield wattson, prom, target


def test_every_rule_group_loads_and_evaluates_ok(stack):
    _w, prom, _t = stack
    groups = rules(prom.base)
    shipped = {p.stem for p in (ROOT / "prometheus" / "rules").glob("*.yml")}
    assert len(groups) >= len(shipped)
    bad = [(g["name"], r.get("name"), r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not bad, bad


def test_every_dashboard_panel_query_returns_data(stack):
    _w, prom, target = stack
    dashboards = dashboard_generator()
    empty = []
    queries = dashboards.panel_queries(host=target, gpu="0", range_="5m", rate_interval="30s")
    assert len(queries) >= 20
    for pq in queries:
        try:
            wait_for(f"data for {pq.panel}", lambda pq=pq: query(prom.base, pq.expr), timeout=10, interval=0.5)
        except AssertionError as exc:  # no data in time (WaitTimeout), or Prometheus rejected the query
            empty.append(f"{pq.dashboard} / {pq.panel} / {pq.ref_id}: {pq.expr}: {exc}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)


LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


def test_every_dashboard_variable_lists_the_host_and_its_gpus(stack):
    """Grafana fills $host and $gpu from label_values(); run as PromQL they list the scraped wattson and
    all four of its GPUs, the gpu variable following the chosen host."""
    _w, prom, target = stack
    dashboards = dashboard_generator()
    variables = {}
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for v in json.loads(path.read_text())["templating"]["list"]:
            if v["type"] == "query":
                variables[(v["name"], v["definition"])] = v
    assert {name for name, _ in variables} == {"host", "gpu", "offset"}
    expected = {"host": {target}, "gpu": {"0", "1", "2", "3"}, "offset": {"+00:00", "+02:00"}}
    for name, definition in variables:
        m = LABEL_VALUES.fullmatch(definition)
        assert m, f"variable {name}: {definition!r} is not label_values(selector, label)"
        selector = dashboards.substitute(m["selector"], {"host": dashboards.grafana_regex_value(target)})
        expr = f"group by ({m['label']}) ({selector})"
        result = wait_for(f"values of ${name}", lambda expr=expr: query(prom.base, expr), timeout=10)
        values = {r["metric"][m["label"]] for r in result}
        assert values == expected[name], f"${name} ({expr}) lists {values}"


def test_budget_alert_fires_from_configuration(stack):
    """Each scope's budget alert fires once, at the configured day boundary (+02:00), with its budget."""
    _w, prom, target = stack

    def firing() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in alerts(prom.base):
            if a["state"] == "firing" and a["labels"]["alertname"] == "WattsonMonthlyCostBudgetExceeded":
                out.setdefault(a["labels"]["scope"], []).append(a)
        return out if set(out) >= {"instance", "cluster", "fleet", "namespace"} else {}

    scopes = wait_for("monthly cost budget alerts of four scopes", firing, timeout=60)
    assert [a["labels"]["instance"] for a in scopes["instance"]] == [target]
    assert [a["labels"]["cluster"] for a in scopes["cluster"]] == [CLUSTER]
    assert [a["labels"]["namespace"] for a in scopes["namespace"]] == ["serving"]
    for a in (a for found in scopes.values() for a in found):
        assert a["labels"]["offset"] == "+02:00" and a["labels"]["currency"] == "EUR", a["labels"]
        assert a["labels"].get("severity") and a["annotations"].get("summary"), a
        assert "more than its monthly budget of 0.00 EUR" in a["annotations"]["description"], a["annotations"]
    carbon = wait_for("the carbon intensity alert firing", lambda: [
        a for a in alerts(prom.base) if a["state"] == "firing"
        and a["labels"]["alertname"] == "WattsonGridCarbonIntensityHigh"], timeout=60)
    assert carbon


def test_no_data_quality_alert_fires_on_a_healthy_stack(stack):
    _w, prom, _t = stack
    noisy = [a["labels"]["alertname"] for a in alerts(prom.base) if a["state"] == "firing"
             and a["labels"]["alertname"] in ("WattsonDown", "WattsonAbsent", "WattsonGPUDown", "WattsonGPUMissing",
                                              "WattsonSamplerStalled", "WattsonGridSignalStale",
                                              "WattsonGridSignalUnknown", "WattsonGridSourceDown")]
    assert not noisy


@pytest.mark.parametrize("workload_metric, gpu_metric", [
    ("wattson_workload_cost_total", "wattson_gpu_cost_total"),
    ("wattson_workload_co2e_grams_total", "wattson_gpu_co2e_grams_total"),
    ("wattson_workload_energy_joules_total", "wattson_gpu_energy_joules_total"),
])
def test_workload_totals_add_up_to_gpu_totals(stack, workload_metric, gpu_metric):
    _w, prom, target = stack
    expr = (f'sum by (gpu) ({workload_metric}{{instance="{target}"}}) '
            f'/ on (gpu) sum by (gpu) ({gpu_metric}{{instance="{target}"}})')
    ratios = wait_for(f"{workload_metric} / {gpu_metric}", lambda: query(prom.base, expr), timeout=20)
    assert len(ratios) == 4
    for r in ratios:
        assert float(r["value"][1]) == pytest.approx(1.0, abs=1e-9), r


def test_per_job_cost_is_visible_and_split_between_jobs(stack):
    _w, prom, target = stack
    expr = (f'sum by (kind, workload) (wattson_workload_cost_total{{instance="{target}",'
            'kind!~"idle|unattributed|overflow"})')
    result = wait_for("per-job cost", lambda: query(prom.base, expr), timeout=20)
    jobs = {(r["metric"]["kind"], r["metric"]["workload"]): float(r["value"][1]) for r in result}
    assert ("slurm_job", "4242") in jobs and ("slurm_job", "4243") in jobs
    assert any(kind == "pod" for kind, _ in jobs)
    assert all(v > 0 for v in jobs.values())


def _at_rule_time(prom, rule: str, raw: str) -> tuple[float, float, float]:
    """(time, rule value, raw value): the rule's latest sample (a selector, or an aggregation of one) and the
    raw expression, both at the time of that sample."""
    selector = rule[rule.index("(") + 1:rule.rindex(")")] if rule.startswith("sum(") else rule
    latest = wait_for(f"{rule} recorded", lambda: query(prom.base, f"max(timestamp({selector}))"), timeout=20)
    at = float(latest[0]["value"][1])
    got = query(prom.base, rule, at=at)
    want = query(prom.base, raw, at=at)
    assert len(got) == 1 and len(want) == 1, (rule, got, raw, want)
    return at, float(got[0]["value"][1]), float(want[0]["value"][1])


@pytest.mark.parametrize("period, rule", [("day", "today"), ("month", "month_to_date")])
@pytest.mark.parametrize("offset", ["+00:00", "+02:00"])
def test_today_and_month_to_date_are_wattsons_own_totals(stack, period, rule, offset):
    """The rules' today and month to date per instance are exactly what wattson exports for the period
    (the sum of wattson_period_energy_joules), read at the same instant."""
    _w, prom, target = stack
    sel = f'instance="{target}",offset="{offset}"'
    _at, got, want = _at_rule_time(
        prom, f"instance:wattson_gpu_energy_joules:{rule}{{{sel}}}",
        f'sum(wattson_period_energy_joules{{{sel},period="{period}"}})')
    assert want > 0 and got == pytest.approx(want, rel=1e-9, abs=1e-9)
    _at, got, want = _at_rule_time(
        prom, f'sum(instance:wattson_gpu_net_cost:{rule}{{{sel},currency="EUR"}})',
        f'sum(wattson_period_cost{{{sel},period="{period}",currency="EUR"}})')
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_today_is_the_counters_increase_since_wattson_started(stack):
    """wattson started from nothing today (unless midnight passed since): today's energy from the rules is
    then the increase of its energy counters since it started, their value now."""
    _w, prom, target = stack
    sel = f'instance="{target}",offset="+00:00"'
    at, got, counters = _at_rule_time(prom, f"instance:wattson_gpu_energy_joules:today{{{sel}}}",
                                      f'sum(wattson_gpu_energy_joules_total{{instance="{target}"}})')
    start = query(prom.base, f'wattson_period_start_timestamp_seconds{{{sel},period="day"}}', at=at)
    started = query(prom.base, f'process_start_time_seconds{{instance="{target}"}}', at=at)
    if float(start[0]["value"][1]) > float(started[0]["value"][1]):
        pytest.skip("midnight (UTC) passed while the test ran")
    assert counters > 0 and got == pytest.approx(counters, rel=1e-9, abs=1e-9)
