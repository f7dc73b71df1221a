"""Run a real Prometheus (Debian's /usr/bin/prometheus) with the shipped config and rules, for tests.

    with start_prometheus(tmp_path, wattson_target=f"127.0.0.1:{daemon.port}") as prom:
        wait_for("wattson scraped", lambda: query(prom.base, 'up{job="wattson"} == 1'), timeout=30)
        groups = rules(prom.base)

The shipped prometheus/prometheus.yml is rewritten for the test: the wattson job scrapes the given
target(s) instead of its file_sd files (optionally with target labels, e.g. a `cluster`), Prometheus
scrapes itself on its own port, the Alertmanager section is dropped, and scrape and evaluation intervals
are the test's. Rule files are copied with their groups' own `interval` removed, so every group follows
the test's evaluation interval (the rules give the same results at any interval: today and month to
date are wattson's own period totals, read as they are), and optionally with every alert's `for`
shortened, so an alert driven by configuration fires within the test.

The binary is the `prometheus` on PATH: missing, the test is skipped, or fails under CI=true
(tests.conftest.require_tool).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from bench.common import WaitTimeout, free_port, stop_process, wait_for
from tests.conftest import require_tool

__all__ = ["Prometheus", "alerts", "dashboard_generator", "dashboard_queries", "free_port", "query", "rules",
           "shipped_rule_files", "start_prometheus", "targets", "wait_for"]

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "prometheus"
DASHBOARD_GENERATOR = ROOT / "grafana" / "dashboards.py"
SHIPPED_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
READY_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 10.0


def shipped_rule_files() -> list[Path]:
    """The rule files prometheus.yml loads, as absolute paths, in its order."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    return [(PROMETHEUS_DIR / f).resolve() for f in cfg["rule_files"]]


@dataclass
class Prometheus:
    """A running Prometheus: its base URL and where its config, rules and log are."""

    base: str
    port: int
    proc: subprocess.Popen[bytes]
    config_path: Path
    rule_files: list[Path]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def render_config(wattson_targets: Sequence[str], prometheus_target: str, rule_files: Sequence[Path],
                  scrape_interval: str, evaluation_interval: str,
                  target_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The shipped prometheus.yml with its targets, rule files and intervals replaced for a test, and the
    wattson targets given `target_labels` (as file_sd's `labels` would)."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["scrape_timeout"] = scrape_interval
    cfg["global"]["evaluation_interval"] = evaluation_interval
    cfg.pop("alerting", None)
    cfg["rule_files"] = [str(p) for p in rule_files]
    jobs = []
    for job in cfg["scrape_configs"]:
        job = {k: v for k, v in job.items()
               if k not in ("file_sd_configs", "static_configs", "scrape_interval", "scrape_timeout")}
        if job["job_name"] == "wattson":
            job["static_configs"] = [{"targets": list(wattson_targets)}
                                     | ({"labels": dict(target_labels)} if target_labels else {})]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [prometheus_target]}]
        else:
            continue
        jobs.append(job)
    names = {j["job_name"] for j in jobs}
    if names != {"wattson", "prometheus"}:
        raise ValueError(f"{SHIPPED_CONFIG}: expected jobs wattson and prometheus, found {sorted(names)}")
    cfg["scrape_configs"] = jobs
    return cfg


def copy_rules_for_test(rule_files: Sequence[Path], dest: Path, keep_group_intervals: bool = False,
                        alert_for: str | None = None) -> list[Path]:
    """Copies of the rule files whose groups all follow the global evaluation interval (unless
    keep_group_intervals) and, if alert_for is given, whose alerts all use that `for` duration."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(rule_files):
        doc = yaml.safe_load(Path(src).read_text())
        for group in doc.get("groups", []):
            if not keep_group_intervals:
                group.pop("interval", None)
            for rule in group.get("rules", []):
                if alert_for is not None and "alert" in rule:
                    rule["for"] = alert_for
        path = dest / f"{i:02d}-{Path(src).name}"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(path)
    return out


@contextmanager
def start_prometheus(tmp_path: Path, wattson_target: str | Sequence[str],
                     rule_files: Sequence[Path] | None = None, scrape_interval: str = "1s",
                     evaluation_interval: str | None = None, keep_group_intervals: bool = False,
                     alert_for: str | None = None, extra_args: Sequence[str] = (),
                     binary: str | None = None, target_labels: dict[str, str] | None = None) -> Iterator[Prometheus]:
    """Start Prometheus on a free loopback port with a fresh TSDB under tmp_path; stop it on exit.

    rule_files defaults to the shipped ones; evaluation_interval to scrape_interval. The rule files
    are used as copies: with their groups' intervals removed unless keep_group_intervals, and with
    every alert's `for` set to alert_for if given (e.g. "0s" to see an alert fire at once instead of
    after its 5 minutes); target_labels are added to every wattson target. Raises AssertionError (with
    Prometheus's log) if it exits or is not ready within 30 s."""
    binary = binary or require_tool("prometheus")
    targets = [wattson_target] if isinstance(wattson_target, str) else list(wattson_target)
    evaluation_interval = evaluation_interval or scrape_interval
    port = free_port()
    workdir = tmp_path / f"prometheus-{port}"
    workdir.mkdir(parents=True)
    sources = [Path(p).resolve() for p in (rule_files if rule_files is not None else shipped_rule_files())]
    rules_used = copy_rules_for_test(sources, workdir / "rules", keep_group_intervals, alert_for)
    config_path = workdir / "prometheus.yml"
    config = render_config(targets, f"127.0.0.1:{port}", rules_used, scrape_interval, evaluation_interval,
                           target_labels)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "prometheus.log"
    cmd = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=info", *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    prom = Prometheus(f"http://127.0.0.1:{port}", port, proc, config_path, rules_used, log_path)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{prom.log()}")
            with urllib.request.urlopen(prom.base + "/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)

        try:
            wait_for("prometheus ready (/-/ready 200)", ready, READY_TIMEOUT_SECONDS)
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}\n{prom.log()}") from None
        yield prom
    finally:
        stop_process(proc, grace_seconds=10)


def api_get(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus HTTP API path and return its `data`; AssertionError naming the path on error."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise AssertionError(f"prometheus {path}: HTTP {exc.code}: {detail}") from exc
    if body.get("status") != "success":
        raise AssertionError(f"prometheus {path}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query; returns the result list ({metric, value} for vectors). Scalars and strings
    come back as a one-element list with an empty metric."""
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api_get(base, "/api/v1/query", **params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def rules(base: str) -> list[dict[str, Any]]:
    """Rule groups from /api/v1/rules, each with its rules' health and lastError."""
    return list(api_get(base, "/api/v1/rules")["groups"])


def alerts(base: str) -> list[dict[str, Any]]:
    """Active (pending or firing) alerts from /api/v1/alerts."""
    return list(api_get(base, "/api/v1/alerts")["alerts"])


def targets(base: str) -> list[dict[str, Any]]:
    """Active scrape targets from /api/v1/targets."""
    return list(api_get(base, "/api/v1/targets")["activeTargets"])


def dashboard_generator() -> ModuleType:
    """grafana/dashboards.py as a module (grafana/ is not a package), loaded once."""
    name = "wattson_grafana_dashboards"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DASHBOARD_GENERATOR)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {DASHBOARD_GENERATOR}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def dashboard_queries(host: str | None = None, gpu: str | None = None, range_: str = "1h",
                      rate_interval: str = "1m", offset: str = "+00:00") -> list[Any]:
    """Every dashboard panel query with its variables substituted (grafana/dashboards.py's
    panel_queries): items with .dashboard, .panel, .ref_id, .expr and .instant."""
    return list(dashboard_generator().panel_queries(host=host, gpu=gpu, range_=range_,
                                                    rate_interval=rate_interval, offset=offset))
