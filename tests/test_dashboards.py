"""The committed Grafana dashboards: in sync with grafana/dashboards.py, and well-formed for provisioning.

Checks what Grafana relies on rather than what the generator happens to write: unique uids naming
their files, the links between dashboards, every panel, query and variable following the datasource
variable (whose default is the provisioned data source), units that fit what each query measures,
currency overrides that match the legends they are for, a layout without overlaps, host filters, and
the panel_queries() helper. tests/test_e2e.py runs every query and variable against a real Prometheus
scraping wattson; the last test here checks each query parses and evaluates with no data at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.promstack import dashboard_generator, free_port, query, start_prometheus

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana unit ids the panels may use (a typo renders the raw number without complaint).
UNITS = {"watt", "kwatth", "joule", "massg", "bytes", "percentunit", "s", "none", "short", "suffix:g/kWh"}
MONEY_QUERY = re.compile(r"net_cost|cost_total|price_per_kwh|price_paid")


GEN = dashboard_generator()
UIDS = sorted(d.uid for d in GEN.DASHBOARDS)


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
    edited = next(iter(sorted(tmp_path.glob("*.json"))))
    edited.write_text(edited.read_text().replace('"title": "', '"title": "edited ', 1))
    (tmp_path / "stray.json").write_text("{}")
    assert GEN.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"{edited.name}: differs" in err and "stray.json: not generated" in err


def test_uids_are_unique_and_name_their_files() -> None:
    """Grafana keys provisioned dashboards by uid (links and bookmarks use it); a database id in the
    file would clash with the one Grafana assigns."""
    dashboards = committed()
    uids = [d["uid"] for d in dashboards.values()]
    assert len(uids) == len(set(uids)) == len(GEN.DASHBOARDS)
    for name, d in dashboards.items():
        assert name == f"{d['uid']}.json"
        assert d["title"].strip() and d["description"].strip()
        assert d.get("id") is None, f"{name}: a provisioned dashboard must not carry a database id"


def test_dashboard_links_reach_every_dashboard() -> None:
    """Each dashboard's tag links list all of them: every dashboard carries the tags a link selects."""
    dashboards = committed()
    for name, d in dashboards.items():
        links = [link for link in d["links"] if link["type"] == "dashboards"]
        assert links, f"{name}: no links to the other dashboards"
        for link in links:
            reached = {o["uid"] for o in dashboards.values() if set(link["tags"]) <= set(o["tags"])}
            assert reached == set(UIDS), f"{name}: link {link['tags']} reaches {sorted(reached)}"


def datasource_refs(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every `datasource` value in a dashboard's JSON, with where it is."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                out.append((where, v))
            out.extend(datasource_refs(v, f"{where}/{node.get('title') or node.get('name') or k}"))
    elif isinstance(node, list):
        for item in node:
            out.extend(datasource_refs(item, where))
    return out


@pytest.mark.parametrize("uid", UIDS)
def test_everything_follows_the_datasource_variable_which_defaults_to_the_provisioned_one(uid: str) -> None:
    """Switching the data source switches every panel, query and variable, and a fresh Grafana starts
    on the data source that provisioning creates."""
    d = committed()[f"{uid}.json"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == provisioned_datasource()["type"]
    assert ds["current"]["value"] == provisioned_datasource()["uid"]
    refs = datasource_refs(d)
    assert refs, f"{uid}: no datasource references"
    wrong = [(where, ref) for where, ref in refs if ref != DATASOURCE_REF]
    assert not wrong, f"{uid}: not following ${{datasource}}: {wrong[:5]}"
    for v in variables.values():
        if v["type"] == "query":
            assert v["query"]["query"] == v["definition"], f"{uid}: variable {v['name']}"


@pytest.mark.parametrize(("uid", "panel"), all_panels(), ids=lambda x: x if isinstance(x, str) else x["title"])
def test_panel_has_a_title_a_description_and_queries(uid: str, panel: dict[str, Any]) -> None:
    where = f"{uid}: panel {panel.get('title')!r}"
    assert panel["title"].strip(), where
    assert len(panel["description"].strip()) >= 20, f"{where}: description too short"
    assert panel["targets"], f"{where}: no queries"
    assert all(t["expr"].strip() for t in panel["targets"]), where


def expected_unit(exprs: list[str]) -> set[str]:
    """The units that fit what a panel's queries measure."""
    text = " ".join(exprs)
    if re.search(r"/[^/]*wattson_budget|/ wattson_gpu_power_limit_watts|_ratio\b", text):
        return {"percentunit"}  # a share of a budget or of the power limit
    if re.search(r"\) / sum\(increase\(wattson_workload_energy_joules_total", text):
        return {"percentunit"}  # a share of all attributed energy
    if "energy_joules:rate" in text:
        return {"watt"}  # joules per second
    if "* $job_kwh" in text:  # a per-kWh difference times a job's kWh: money, or grams of CO2e
        return {GEN.MONEY} if "price" in text else {"massg"}
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
    money = unit == "short" and any(MONEY_QUERY.search(t["expr"]) for t in panel["targets"])
    if money:
        units = {o["matcher"]["options"]: o["properties"][0]["value"] for o in overrides}
        for code in ("EUR", "USD", "GBP"):
            assert units.get(f"/(^|\\s){code}$/") == f"currency{code}", f"{where}: no {code} override"
        for t in panel["targets"]:
            assert t["legendFormat"].endswith("{{currency}}"), f"{where}: legend must end with the currency"
    else:
        assert not overrides, f"{where}: unexpected overrides"


def render_legend(legend: str, labels: dict[str, str]) -> str:
    """A series name as Grafana shows it: {{label}} replaced by the series' label values."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)


def money_panels() -> list[tuple[str, dict[str, Any]]]:
    return [(uid, p) for uid, p in all_panels() if p["fieldConfig"]["overrides"]]


@pytest.mark.parametrize(("uid", "panel"), money_panels(), ids=lambda x: x if isinstance(x, str) else x["title"])
def test_currency_overrides_match_their_own_currency_only(uid: str, panel: dict[str, Any]) -> None:
    """Each series of a money panel gets the unit of its own currency: of the overrides' regexes
    (/.../ as Grafana writes them), exactly the one for that currency matches the series' name, for
    currency codes that also occur inside host names."""
    overrides = {o["properties"][0]["value"]: re.compile(o["matcher"]["options"][1:-1])
                 for o in panel["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byRegexp"}
    codes = [unit.removeprefix("currency") for unit in overrides]
    assert codes, f"{uid}: {panel['title']!r}: no currency overrides"
    for target in panel["targets"]:
        for code in codes:
            others = "-".join(c for c in codes if c != code)  # other codes inside the host name
            labels = {"instance": f"{others}-host:9874", "currency": code, "gpu": "0",
                      "job": "wattson", "zone": "DE", "kind": "slurm_job", "workload": "42"}
            name = render_legend(target["legendFormat"], labels)
            matched = [unit for unit, rx in overrides.items() if rx.search(name)]
            assert matched == [f"currency{code}"], f"{uid}: {panel['title']!r}: series {name!r} gets {matched}"


@pytest.mark.parametrize("name", UIDS)
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


def promql_string(literal_body: str) -> str:
    """The value of a double-quoted PromQL string literal's body (only backslash escapes occur here)."""
    return re.sub(r"\\(.)", lambda m: m.group(1), literal_body)


@pytest.mark.parametrize("value", ["10.0.0.1:9874", "gpu-a.example.net:9874", "[::1]:9874", "a|b", "back\\slash",
                                   "x(y)+z?*^$"])
def test_substituted_value_matches_itself_and_nothing_else(value: str) -> None:
    """A host put into `instance=~"..."` the way Grafana escapes it selects exactly that host: the
    PromQL string, read as an anchored regex, matches the value and not look-alikes."""
    pattern = promql_string(GEN.grafana_regex_value(value))
    assert re.fullmatch(pattern, value), pattern
    for other in (value.replace(".", "x"), value + "0", "0" + value, value.replace("|", "")):
        if other != value:
            assert not re.fullmatch(pattern, other), f"{pattern!r} also matches {other!r}"


def test_substitute_rejects_unknown_variables() -> None:
    with pytest.raises(ValueError, match=r"\$nope"):
        GEN.substitute("up{x=~\"$nope\"}", {"host": "a"})


# --- provisioning -----------------------------------------------------------------------------------

def provisioned_datasource() -> dict[str, Any]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert doc["apiVersion"] == 1 and len(doc["datasources"]) == 1
    return dict(doc["datasources"][0])


def test_provisioned_datasource_reaches_the_stacks_prometheus() -> None:
    """The provisioned data source is the one the dashboards name, and its URL is the compose
    service `prometheus` on the port that service listens on."""
    ds = provisioned_datasource()
    assert ds["uid"] == GEN.DATASOURCE_UID and ds["type"] == "prometheus"
    url = urlsplit(ds["url"])
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert url.hostname in services, f"{ds['url']}: {url.hostname} is not a compose service"
    listen = [a for a in services[url.hostname]["command"] if a.startswith("--web.listen-address=")]
    assert listen and listen[0].rsplit(":", 1)[1] == str(url.port), (ds["url"], listen)


@pytest.mark.integration
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """Prometheus parses and evaluates each substituted query (no data here: the end-to-end test
    checks that each returns series against a running wattson)."""
    with start_prometheus(tmp_path, wattson_target=f"127.0.0.1:{free_port()}") as prom:
        for pq in GEN.panel_queries(host="127.0.0.1:9874", gpu="0"):
            query(prom.base, pq.expr)  # raises on a parse or evaluation error, naming the query
