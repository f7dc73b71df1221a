"""The committed Grafana dashboards: in sync with grafana/dashboards.py, and well-formed for provisioning.

Checks uids, the datasource variable on every panel and query, the host/gpu variables, titles,
descriptions and units (the unit must fit what the query measures), layout, provisioning, and
the panel_queries() helper the end-to-end test runs through Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promstack import PROMETHEUS_BINARY, dashboard_generator, free_port, query, start_prometheus

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
EXPECTED_UIDS = {"wattson-fleet", "wattson-gpu", "wattson-grid", "wattson-budget", "wattson-workloads"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
UNITS = {"watt", "kwatth", "joule", "massg", "bytes", "percentunit", "s", "none", "short", "suffix:g/kWh"}


GEN = dashboard_generator()


def committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def all_panels() -> list[tuple[str, dict[str, Any]]]:
    return [(d["uid"], p) for d in committed().values() for p in d["panels"]]


def test_committed_json_is_exactly_what_the_generator_writes() -> None:
    wanted = GEN.render_all()
    on_disk = {p.name: p.read_text() for p in DASHBOARD_DIR.glob("*.json")}
    assert sorted(on_disk) == sorted(wanted), "grafana/dashboards/ holds other files than the generator writes"
    for name, text in wanted.items():
        assert on_disk[name] == text, f"grafana/dashboards/{name} drifted: run python grafana/dashboards.py"
    assert GEN.main(["--check"]) == 0


def test_check_mode_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in GEN.render_all().items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(GEN, "OUT_DIR", tmp_path)
    assert GEN.main(["--check"]) == 0
    edited = tmp_path / "wattson-gpu.json"
    edited.write_text(edited.read_text().replace('"Utilization"', '"Utilisation"'))
    (tmp_path / "stray.json").write_text("{}")
    assert GEN.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "wattson-gpu.json: differs" in err and "stray.json: not generated" in err


def test_five_dashboards_with_fixed_unique_uids() -> None:
    dashboards = committed()
    uids = [d["uid"] for d in dashboards.values()]
    assert set(uids) == EXPECTED_UIDS and len(uids) == len(set(uids))
    for name, d in dashboards.items():
        assert name == f"{d['uid']}.json"
        assert d["title"].startswith("wattson / ") and d["description"]
        assert "wattson" in d["tags"]
        assert d.get("id") is None, f"{name}: a provisioned dashboard must not carry a database id"


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_variables_datasource_host_and_gpu(name: str) -> None:
    d = committed()[f"{name}.json"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "host", "gpu"}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == provisioned_datasource()["uid"]
    host, gpu = variables["host"], variables["gpu"]
    assert host["type"] == "query" and host["definition"] == "label_values(wattson_build_info, instance)"
    assert host["query"]["query"] == host["definition"]
    assert gpu["type"] == "query" and gpu["definition"].startswith("label_values(wattson_gpu_info{")
    assert gpu["definition"].endswith(", gpu)") and "$host" in gpu["definition"]
    for v in (host, gpu):
        assert v["datasource"] == DATASOURCE_REF, f"{name}: variable {v['name']} must use ${{datasource}}"


@pytest.mark.parametrize(("uid", "panel"), all_panels(), ids=lambda x: x if isinstance(x, str) else x["title"])
def test_panel_title_description_datasource(uid: str, panel: dict[str, Any]) -> None:
    where = f"{uid}: panel {panel.get('title')!r}"
    assert panel["title"].strip(), where
    assert len(panel["description"].strip()) >= 20, f"{where}: description too short"
    assert panel["datasource"] == DATASOURCE_REF, f"{where}: datasource"
    assert panel["targets"], f"{where}: no queries"
    for t in panel["targets"]:
        assert t["datasource"] == DATASOURCE_REF, f"{where}: query {t['refId']} datasource"
        assert t["expr"].strip()


def expected_unit(exprs: list[str]) -> set[str]:
    """The units that fit what a panel's queries measure."""
    text = " ".join(exprs)
    if re.search(r"/[^/]*wattson_budget|/ wattson_gpu_power_limit_watts|_ratio\b", text):
        return {"percentunit"}  # a share of a budget or of the power limit
    if re.search(r"\) / sum\(increase\(wattson_workload_energy_joules_total", text):
        return {"percentunit"}  # a share of all attributed energy
    if "energy_joules:rate" in text:
        return {"watt"}  # joules per second
    if "grams_per_kwh" in text:
        return {"suffix:g/kWh"}
    if re.search(r"net_cost|cost_total|price_per_kwh|price_paid", text):
        return {GEN.MONEY}
    if "co2e_grams" in text:
        return {"massg"}
    if "joules" in text:
        return {"kwatth"} if "/ 3.6e6" in text else {"joule"}
    if "_watts" in text:
        return {"watt"}
    if "_bytes" in text:
        return {"bytes"}
    if "_seconds" in text:
        return {"s"}
    return {"none"}


def generator_panels() -> list[tuple[str, Any]]:
    return [(d.uid, p) for d in GEN.DASHBOARDS for p in d.panels]


@pytest.mark.parametrize(("uid", "panel"), generator_panels(), ids=lambda x: x if isinstance(x, str) else x.title)
def test_panel_unit_fits_the_query(uid: str, panel: Any) -> None:
    exprs = [q.expr for q in panel.queries]
    assert panel.unit in expected_unit(exprs), f"{uid}: {panel.title!r}: unit {panel.unit!r} for {exprs}"


@pytest.mark.parametrize(("uid", "panel"), all_panels(), ids=lambda x: x if isinstance(x, str) else x["title"])
def test_committed_units_and_currency_overrides(uid: str, panel: dict[str, Any]) -> None:
    where = f"{uid}: panel {panel['title']!r}"
    unit = panel["fieldConfig"]["defaults"]["unit"]
    assert unit in UNITS, f"{where}: unit {unit!r}"
    overrides = panel["fieldConfig"]["overrides"]
    money = unit == "short" and any(re.search(r"net_cost|cost_total|price_per_kwh|price_paid", t["expr"])
                                    for t in panel["targets"])
    if money:
        units = {o["matcher"]["options"]: o["properties"][0]["value"] for o in overrides}
        for code in ("EUR", "USD", "GBP"):
            assert units.get(f"/(^|\\s){code}$/") == f"currency{code}", f"{where}: no {code} override"
        for t in panel["targets"]:
            assert t["legendFormat"].endswith("{{currency}}"), f"{where}: legend must end with the currency"
    else:
        assert not overrides, f"{where}: unexpected overrides"


def test_currency_override_regex_matches_the_legend_it_is_for() -> None:
    pattern = "/(^|\\s)EUR$/"
    js_like = re.compile(pattern[1:-1])
    assert js_like.search("EUR") and js_like.search("gpu-a:9874 EUR")
    assert not js_like.search("gpu-a:9874 XEUR") and not js_like.search("EUR budget")


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_layout_fits_24_columns_without_overlap(name: str) -> None:
    d = committed()[f"{name}.json"]
    cells: set[tuple[int, int]] = set()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name}: {p['title']!r} gridPos {g}"
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"{name}: {p['title']!r} overlaps another panel"
        cells |= area


def test_every_query_filters_on_the_host_variable_and_gpu_detail_on_gpu() -> None:
    for uid, panel in all_panels():
        for t in panel["targets"]:
            assert 'instance=~"$host' in t["expr"], f"{uid}: {panel['title']!r}: no host filter in {t['expr']}"
            if uid == "wattson-gpu":
                assert 'gpu=~"$gpu"' in t["expr"], f"{uid}: {panel['title']!r}: no gpu filter"


def test_issue_panels_are_present() -> None:
    titles = {d["uid"]: {p["title"] for p in d["panels"]} for d in committed().values()}
    assert {"GPU power now", "Cost today", "Cost this month, share of budget", "CO2e this month",
            "Top hosts by cost this month", "Cost rate (per hour)",
            "Emissions rate (per hour)"} <= titles["wattson-fleet"]
    assert {"Power and power limit", "Memory used and total", "Utilization",
            "GPU energy over the time range"} <= titles["wattson-gpu"]
    assert {"Electricity price (per kWh)", "Grid carbon intensity", "Active sources", "Data age",
            "Price paid (per kWh, energy-weighted, last hour)"} <= titles["wattson-grid"]
    assert {"Spent this month and budget", "Month-end forecast", "Alerts"} <= titles["wattson-budget"]


def test_panel_queries_substitutes_every_variable() -> None:
    queries = GEN.panel_queries(host="127.0.0.1:9874", gpu="0", range_="10m", rate_interval="30s")
    assert len(queries) == sum(len(p["targets"]) for _, p in all_panels())
    for pq in queries:
        assert "$" not in pq.expr, f"{pq.dashboard}: {pq.panel!r}: variable left in {pq.expr}"
        assert 'instance=~"127\\\\.0\\\\.0\\\\.1:9874' in pq.expr, pq.expr
    gpu = [pq for pq in queries if pq.dashboard == "wattson-gpu"]
    assert gpu and all('gpu=~"0"' in pq.expr for pq in gpu)
    assert any("[10m]" in pq.expr for pq in gpu) and any("[30s]" in pq.expr for pq in gpu)
    everything = GEN.panel_queries()
    assert all('instance=~".*' in pq.expr for pq in everything)


def test_regex_escaping_matches_grafana() -> None:
    assert GEN.grafana_regex_value("10.0.0.1:9874") == "10\\\\.0\\\\.0\\\\.1:9874"
    assert GEN.grafana_regex_value("a|b") == "a\\\\|b"
    assert GEN.grafana_regex_value("back\\slash") == "back\\\\\\\\slash"
    with pytest.raises(ValueError, match=r"\$nope"):
        GEN.substitute("up{x=~\"$nope\"}", {"host": "a"})


# --- provisioning -----------------------------------------------------------------------------------

def provisioned_datasource() -> dict[str, Any]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert doc["apiVersion"] == 1 and len(doc["datasources"]) == 1
    return dict(doc["datasources"][0])


def test_datasource_provisioning_has_the_fixed_uid() -> None:
    ds = provisioned_datasource()
    assert ds["uid"] == GEN.DATASOURCE_UID and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090" and ds["isDefault"] is True


def test_dashboard_provisioning_loads_from_files() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "wattson.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards/wattson"
    assert provider["allowUiUpdates"] is False


@pytest.mark.integration
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """Prometheus parses and evaluates each substituted query (no data here: the end-to-end test
    checks that each returns series against a running wattson)."""
    if not Path(PROMETHEUS_BINARY).exists():
        pytest.skip(f"{PROMETHEUS_BINARY} not installed (Debian: apt-get install prometheus)")
    with start_prometheus(tmp_path, wattson_target=f"127.0.0.1:{free_port()}") as prom:
        for pq in GEN.panel_queries(host="127.0.0.1:9874", gpu="0"):
            query(prom.base, pq.expr)  # raises on a parse or evaluation error, naming the query
