"""Benchmark 6: what wattson's rules cost Prometheus on a month of history, against the rules they replace.

A synthetic fleet (hosts with 8 GPUs' worth of series each) gets a month of history backfilled with
`promtool tsdb create-blocks-from openmetrics` (at a 1-minute step: 32 days of the increments the old
rules summed, the last 7 hours of everything else, which is all any rule reads), then a real
`prometheus` (127.0.0.1, a free port, stopped afterwards) loads it, scrapes the same fleet live from a
small exposition server (one target, honor_labels), and evaluates the shipped rule groups together with
the old period rules (kept here as the baseline, renamed baseline_*, with their month of recorded
increments). Per rule: samples read in one evaluation (query stats, `stats=all`, at its last evaluation
time), per input series, the peak held at once, and the evaluation time Prometheus reports; per group,
its evaluation time. Two fleet sizes give a line to extrapolate to 1,250 hosts, against the 4,000
samples per input series the rules are built to stay within and Prometheus's default
--query.max-samples (50,000,000).
"""

from __future__ import annotations

import calendar
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .common import ROOT, fit_line, free_port, stop_process, wait_for

RULES_DIR = ROOT / "prometheus" / "rules"
STEP_SECONDS = 60  # history step and live scrape interval
GPUS = 8
TARGET_HOSTS = 1250
SAMPLES_PER_SERIES_TARGET = 4000
DEFAULT_MAX_SAMPLES = 50_000_000
LIVE_HISTORY_HOURS = 7  # the longest range any rule reads is 6h
OFFSETS = (("+00:00", 0), ("+02:00", 7200))
PERIODS = ("day", "month")
PRICE_EUR_PER_KWH = 0.30
PUE = 1.2
INTENSITY = 400.0
SCOPES = ("namespace", "account", "user")

# The period rules the shipped ones replace: today and month to date summed from a month of recorded
# one-minute increments (each rule reading its own previous output), and the forecasts built on them.
BASELINE_RULES = """groups:
- name: wattson.accounting
  interval: 1m
  rules:
    - record: global:wattson_utc_period:info
      expr: |
        count_values("utc_date",
          year(vector(time())) * 10000 + month(vector(time())) * 100 + day_of_month(vector(time())))
        * on () group_left (utc_month)
        count_values("utc_month", year(vector(time())) * 100 + month(vector(time())))
    - record: global:wattson_month_remaining:seconds
      expr: |
        (days_in_month(vector(time())) - day_of_month(vector(time())) + 1) * 86400
        - vector(time()) % 86400
    - record: instance:wattson_gpu_net_cost:increment
      expr: |
        (
            sum by (job, instance, currency) (
                rate(wattson_gpu_cost_total[5m])
              - (rate(wattson_gpu_cost_credit_total[5m]) or rate(wattson_gpu_cost_total[5m]) * 0)
            )
          * on (job, instance, currency) (
                time() - max by (job, instance, currency) (timestamp(instance:wattson_gpu_net_cost:increment))
              or
                0 * sum by (job, instance, currency) (rate(wattson_gpu_cost_total[5m]))
            )
        )
        * on () group_left (utc_date, utc_month) global:wattson_utc_period:info
    - record: instance:wattson_gpu_co2e_grams:increment
      expr: |
        (
            sum by (job, instance) (rate(wattson_gpu_co2e_grams_total[5m]))
          * on (job, instance) (
                time() - max by (job, instance) (timestamp(instance:wattson_gpu_co2e_grams:increment))
              or
                0 * sum by (job, instance) (rate(wattson_gpu_co2e_grams_total[5m]))
            )
        )
        * on () group_left (utc_date, utc_month) global:wattson_utc_period:info
    - record: instance:wattson_gpu_energy_joules:increment
      expr: |
        (
            sum by (job, instance) (rate(wattson_gpu_energy_joules_total[5m]))
          * on (job, instance) (
                time() - max by (job, instance) (timestamp(instance:wattson_gpu_energy_joules:increment))
              or
                0 * sum by (job, instance) (rate(wattson_gpu_energy_joules_total[5m]))
            )
        )
        * on () group_left (utc_date, utc_month) global:wattson_utc_period:info
    - record: instance:wattson_gpu_net_cost:today
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_net_cost:increment[1d])
          and on (utc_date) global:wattson_utc_period:info
        )
    - record: instance:wattson_gpu_net_cost:month_to_date
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_net_cost:increment[31d])
          and on (utc_month) global:wattson_utc_period:info
        )
    - record: instance:wattson_gpu_co2e_grams:today
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_co2e_grams:increment[1d])
          and on (utc_date) global:wattson_utc_period:info
        )
    - record: instance:wattson_gpu_co2e_grams:month_to_date
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_co2e_grams:increment[31d])
          and on (utc_month) global:wattson_utc_period:info
        )
    - record: instance:wattson_gpu_energy_joules:today
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_energy_joules:increment[1d])
          and on (utc_date) global:wattson_utc_period:info
        )
    - record: instance:wattson_gpu_energy_joules:month_to_date
      expr: |
        sum without (utc_date, utc_month) (
          sum_over_time(instance:wattson_gpu_energy_joules:increment[31d])
          and on (utc_month) global:wattson_utc_period:info
        )
    - record: fleet:wattson_gpu_net_cost:today
      expr: sum by (currency) (instance:wattson_gpu_net_cost:today)
    - record: fleet:wattson_gpu_net_cost:month_to_date
      expr: sum by (currency) (instance:wattson_gpu_net_cost:month_to_date)
    - record: fleet:wattson_gpu_co2e_grams:today
      expr: sum(instance:wattson_gpu_co2e_grams:today)
    - record: fleet:wattson_gpu_co2e_grams:month_to_date
      expr: sum(instance:wattson_gpu_co2e_grams:month_to_date)
    - record: fleet:wattson_gpu_energy_joules:today
      expr: sum(instance:wattson_gpu_energy_joules:today)
    - record: fleet:wattson_gpu_energy_joules:month_to_date
      expr: sum(instance:wattson_gpu_energy_joules:month_to_date)
    - record: instance:wattson_gpu_net_cost_per_hour:rate1h
      expr: |
        3600 * sum by (job, instance, currency) (
            rate(wattson_gpu_cost_total[1h])
          - (rate(wattson_gpu_cost_credit_total[1h]) or rate(wattson_gpu_cost_total[1h]) * 0)
        )
    - record: instance:wattson_gpu_net_cost_per_hour:rate6h
      expr: |
        3600 * sum by (job, instance, currency) (
            rate(wattson_gpu_cost_total[6h])
          - (rate(wattson_gpu_cost_credit_total[6h]) or rate(wattson_gpu_cost_total[6h]) * 0)
        )
    - record: instance:wattson_gpu_net_cost:month_end_forecast1h
      expr: |
        instance:wattson_gpu_net_cost:month_to_date
        + on (job, instance, currency)
          instance:wattson_gpu_net_cost_per_hour:rate1h / 3600
          * on () group_left () global:wattson_month_remaining:seconds
    - record: instance:wattson_gpu_net_cost:month_end_forecast6h
      expr: |
        instance:wattson_gpu_net_cost:month_to_date
        + on (job, instance, currency)
          instance:wattson_gpu_net_cost_per_hour:rate6h / 3600
          * on () group_left () global:wattson_month_remaining:seconds
    - record: fleet:wattson_gpu_net_cost:month_end_forecast6h
      expr: sum by (currency) (instance:wattson_gpu_net_cost:month_end_forecast6h)
"""


def baseline_rules() -> str:
    """The old rules, group and record names prefixed with baseline_ so they run beside the shipped ones."""
    text = BASELINE_RULES.replace("- name: wattson.accounting", "- name: baseline.accounting")
    return re.sub(r"\b(instance|fleet|global):wattson_", r"baseline_\1:wattson_", text)


# --- the synthetic fleet ---------------------------------------------------------------------------

def period_start(period: str, offset: int, t: float) -> int:
    """UNIX time the day or month containing t started, at a fixed UTC offset."""
    local = int(t) + offset
    day = local - local % 86400
    if period == "day":
        return day - offset
    d = datetime.fromtimestamp(day, tz=timezone.utc)
    return calendar.timegm((d.year, d.month, 1, 0, 0, 0)) - offset


class Fleet:
    """Hosts whose GPUs draw constant power from `t0`; every series is a function of time."""

    def __init__(self, hosts: int, t0: float) -> None:
        self.hosts = hosts
        self.t0 = t0

    @staticmethod
    def instance(i: int) -> str:
        return f"h{i:04d}:9874"

    @staticmethod
    def gpu_watts(g: int) -> float:
        return 300.0 + 50.0 * (g % 4)

    def host_watts(self) -> float:
        return sum(self.gpu_watts(g) for g in range(GPUS))

    def since(self, t: float, start: float) -> float:
        return max(0.0, t - max(start, self.t0))

    def series(self, t: float) -> Iterator[tuple[str, str, float]]:
        """(family, series with labels, value) of every scraped series at time t."""
        for i in range(self.hosts):
            host = f'job="wattson",instance="{self.instance(i)}",cluster="c{i % 3}"'
            yield "wattson_pue", f"wattson_pue{{{host}}}", PUE
            yield ("wattson_grid_carbon_intensity_grams_per_kwh",
                   f'wattson_grid_carbon_intensity_grams_per_kwh{{{host},zone="DE"}}', INTENSITY)
            for g in range(GPUS):
                gl = f'{host},gpu="{g}",uuid="GPU-{i:04d}-{g}"'
                joules = self.gpu_watts(g) * self.since(t, 0)
                kwh = joules * PUE / 3.6e6
                yield "wattson_gpu_info", f"wattson_gpu_info{{{gl}}}", 1.0
                yield "wattson_gpu_power_watts", f"wattson_gpu_power_watts{{{gl}}}", self.gpu_watts(g)
                yield "wattson_gpu_power_limit_watts", f"wattson_gpu_power_limit_watts{{{gl}}}", 700.0
                yield "wattson_gpu_energy_joules_total", f"wattson_gpu_energy_joules_total{{{gl}}}", joules
                yield ("wattson_gpu_cost_total", f'wattson_gpu_cost_total{{{gl},currency="EUR"}}',
                       kwh * PRICE_EUR_PER_KWH)
                yield ("wattson_gpu_cost_credit_total", f'wattson_gpu_cost_credit_total{{{gl},currency="EUR"}}',
                       0.0)
                yield "wattson_gpu_co2e_grams_total", f"wattson_gpu_co2e_grams_total{{{gl}}}", kwh * INTENSITY
                for signal in ("price", "carbon"):
                    yield ("wattson_gpu_unpriced_energy_joules_total",
                           f'wattson_gpu_unpriced_energy_joules_total{{{gl},signal="{signal}"}}', 0.0)
            for period in PERIODS:
                for label, offset in OFFSETS:
                    pl = f'{host},period="{period}",offset="{label}"'
                    start = period_start(period, offset, t)
                    joules = self.host_watts() * self.since(t, start)
                    kwh = joules * PUE / 3.6e6
                    yield ("wattson_period_start_timestamp_seconds",
                           f"wattson_period_start_timestamp_seconds{{{pl}}}", float(start))
                    yield "wattson_period_energy_joules", f"wattson_period_energy_joules{{{pl}}}", joules
                    yield ("wattson_period_cost", f'wattson_period_cost{{{pl},currency="EUR"}}',
                           kwh * PRICE_EUR_PER_KWH)
                    yield "wattson_period_co2e_grams", f"wattson_period_co2e_grams{{{pl}}}", kwh * INTENSITY
                    for scope in SCOPES:  # each a third of the host's energy
                        sl = f'{pl},scope="{scope}",{scope}="{scope}-{i % 5}"'
                        yield ("wattson_scope_period_energy_joules",
                               f"wattson_scope_period_energy_joules{{{sl}}}", joules / 3)
                        yield ("wattson_scope_period_cost", f'wattson_scope_period_cost{{{sl},currency="EUR"}}',
                               kwh * PRICE_EUR_PER_KWH / 3)
                        yield ("wattson_scope_period_co2e_grams", f"wattson_scope_period_co2e_grams{{{sl}}}",
                               kwh * INTENSITY / 3)
            own = f'{host},scope="instance"'
            for period, amount in (("day", 20.0), ("month", 500.0)):
                yield ("wattson_budget_cost", f'wattson_budget_cost{{{own},period="{period}",currency="EUR"}}',
                       amount)
            yield "wattson_budget_co2e_grams", f'wattson_budget_co2e_grams{{{own},period="month"}}', 1e6
            yield ("wattson_carbon_intensity_threshold_grams_per_kwh",
                   f"wattson_carbon_intensity_threshold_grams_per_kwh{{{own}}}", 300.0)
            if i < 2:  # two hubs state the fleet's and each namespace's budgets
                hub = f'job="wattson",instance="{self.instance(i)}",cluster="c{i % 3}"'
                yield ("wattson_budget_cost",
                       f'wattson_budget_cost{{{hub},scope="fleet",period="month",currency="EUR"}}', 1e5)
                for n in range(5):
                    yield ("wattson_budget_cost", f'wattson_budget_cost{{{hub},scope="namespace",'
                           f'namespace="namespace-{n}",period="month",currency="EUR"}}', 2e4)

    def increments(self, t: float) -> Iterator[tuple[str, str, float]]:
        """The old rules' one-minute increments (their recorded output) at time t."""
        d = datetime.fromtimestamp(t, tz=timezone.utc)
        dated = f'utc_date="{d:%Y%m%d}",utc_month="{d:%Y%m}"'
        kwh = self.host_watts() * STEP_SECONDS * PUE / 3.6e6
        for i in range(self.hosts):
            host = f'job="wattson",instance="{self.instance(i)}"'
            for name, value, extra in (("net_cost", kwh * PRICE_EUR_PER_KWH, ',currency="EUR"'),
                                       ("co2e_grams", kwh * INTENSITY, ""),
                                       ("energy_joules", self.host_watts() * STEP_SECONDS, "")):
                family = f"baseline_instance:wattson_gpu_{name}:increment"
                yield family, f"{family}{{{host}{extra},{dated}}}", value


BLOCK_SECONDS = 2 * 3600  # the block length promtool's backfill writes, aligned to multiples of it


def write_history(fleet: Fleet, directory: Path, end: float, days: int) -> tuple[list[Path], int]:
    """OpenMetrics history ending at `end`, one file per 2-hour block (promtool's backfill reads its whole
    input once for every block it writes, so one file per block keeps that linear): the increments for
    `days` days, everything else for the last hours. Returns the files and the number of samples."""
    first, last = int(end) - days * 86400, int(end)
    live_from = last - LIVE_HISTORY_HOURS * 3600
    files: list[Path] = []
    count = 0
    for block in range(first - first % BLOCK_SECONDS, last + 1, BLOCK_SECONDS):
        by_series: dict[str, dict[str, list[str]]] = {}
        for ts in range(max(block, first), min(block + BLOCK_SECONDS, last + 1), STEP_SECONDS):
            points = list(fleet.increments(ts)) + (list(fleet.series(ts)) if ts >= live_from else [])
            for family, name, value in points:
                by_series.setdefault(family, {}).setdefault(name, []).append(f"{value!r} {ts}\n")
        if not by_series:
            continue
        path = directory / f"history-{block}.om"
        with open(path, "w") as out:
            for family, in_family in by_series.items():
                out.write(f"# TYPE {family} unknown\n")
                for name, lines in in_family.items():
                    prefix = name + " "
                    out.writelines(prefix + line for line in lines)
                    count += len(lines)
            out.write("# EOF\n")
        files.append(path)
    return files, count


def backfill(files: Sequence[Path], data: Path) -> None:
    """promtool tsdb create-blocks-from openmetrics, one file (one block) at a time, two at once."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool not installed (Debian: apt-get install prometheus)")

    def one(path: Path) -> None:
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet", str(path), str(data)],
                       check=True, capture_output=True, timeout=600)
        path.unlink()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, files))


@contextmanager
def live_exposition(fleet: Fleet) -> Iterator[int]:
    """Serve the fleet's current values on 127.0.0.1:<port>/metrics (one target for every host)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            now = time.time()
            families: dict[str, list[str]] = {}
            for family, series, value in fleet.series(now):
                families.setdefault(family, []).append(f"{series} {value!r}\n")
            body = "".join(f"# TYPE {f} untyped\n" + "".join(lines) for f, lines in families.items()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


# --- Prometheus ------------------------------------------------------------------------------------

def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body.get('error')}")
    return body["data"]


def rule_files(workdir: Path) -> list[Path]:
    """The shipped rule files and the baseline, every group at the one evaluation interval of the run."""
    out = []
    sources = sorted(RULES_DIR.glob("*.yml"))
    for i, src in enumerate(sources):
        doc = yaml.safe_load(src.read_text())
        for group in doc["groups"]:
            group.pop("interval", None)
        path = workdir / f"{i:02d}-{src.name}"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(path)
    baseline = workdir / "baseline.yml"
    doc = yaml.safe_load(baseline_rules())
    for group in doc["groups"]:
        group.pop("interval", None)
    baseline.write_text(yaml.safe_dump(doc, sort_keys=False))
    return [*out, baseline]


def blocks_loaded(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^prometheus_tsdb_blocks_loaded (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else -1.0


@contextmanager
def prometheus(data: Path, workdir: Path, target_port: int, evaluation_seconds: int) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus not installed (Debian: apt-get install prometheus)")
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{STEP_SECONDS}s", "scrape_timeout": "30s",
                   "evaluation_interval": f"{evaluation_seconds}s"},
        "rule_files": [str(p) for p in rule_files(workdir)],
        "scrape_configs": [{"job_name": "fleet", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
                             "--storage.tsdb.retention.time=3650d", f"--web.listen-address=127.0.0.1:{port}",
                             "--query.timeout=5m", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for("prometheus ready", ready, timeout=300, interval=0.5)
        yield base
    finally:
        stop_process(proc, grace_seconds=20)
        log.close()


def wait_compacted(base: str, timeout: float) -> float:
    """Wait until the backfilled blocks are compacted (their count stops falling); returns the count."""
    deadline = time.time() + timeout
    last, since = blocks_loaded(base), time.time()
    while time.time() < deadline:
        time.sleep(2)
        now = blocks_loaded(base)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since > 75:  # the compactor runs once a minute
            break
    return last


def evaluated_groups(base: str, after: float) -> list[dict[str, Any]]:
    groups = api(base, "/api/v1/rules", type="record")["groups"]
    done = all(_ts(r.get("lastEvaluation")) > after for g in groups for r in g["rules"])
    return groups if done else []


def _ts(text: str | None) -> float:
    if not text or text.startswith("0001"):
        return 0.0
    text = re.sub(r"(\.\d{6})\d*", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


SELECTOR = re.compile(r"((?:[a-z_]+:)?wattson_[a-z0-9_]+(?::[a-z0-9_]+)?)(\{[^}]*\})?(?:\[(\d+[smhd])\])?")


def input_series(base: str, expr: str, at: float) -> int:
    """How many distinct series the rule's selectors read: per metric, its series with a sample within
    the longest range the rule reads it over (a series read twice counts once). The baseline's daily
    increments count as one series per host and quantity, their utc_date and utc_month aside: one chain
    that the old rules read back a month of."""
    longest: dict[str, int] = {}
    for name, _matchers, rng in SELECTOR.findall(expr):
        seconds = _seconds(rng) if rng else 300
        longest[name] = max(longest.get(name, 0), seconds)
    total = 0
    for name, seconds in longest.items():
        query = f"count(count without (utc_date, utc_month) (last_over_time({name}[{seconds}s])))"
        res = api(base, "/api/v1/query", query=query, time=f"{at:.3f}")
        total += int(float(res["result"][0]["value"][1])) if res["result"] else 0
    return total


def _seconds(rng: str) -> int:
    return int(rng[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[rng[-1]]


def measure(base: str, polls: int, evaluation_seconds: int,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Group and rule evaluation times over `polls` evaluations, and each rule's query statistics."""
    group_times: dict[str, list[float]] = {}
    rule_times: dict[tuple[str, str], list[float]] = {}
    groups: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    while len(next(iter(group_times.values()), [])) < polls:
        groups = api(base, "/api/v1/rules", type="record")["groups"]
        for g in groups:
            key = (g["name"], g.get("lastEvaluation", ""))
            if key in seen:
                continue
            seen.add(key)
            group_times.setdefault(g["name"], []).append(float(g["evaluationTime"]))
            for r in g["rules"]:
                rule_times.setdefault((g["name"], r["name"]), []).append(float(r["evaluationTime"]))
        time.sleep(evaluation_seconds / 3)
    rules = []
    for g in groups:
        for r in g["rules"]:
            at = _ts(r["lastEvaluation"])
            data = api(base, "/api/v1/query", query=r["query"], time=f"{at:.3f}", stats="all")
            stats = data.get("stats", {})
            samples = stats.get("samples", {})
            total = int(samples.get("totalQueryableSamples", 0))
            series = input_series(base, r["query"], at)
            rules.append({
                "group": g["name"], "rule": r["name"], "health": r["health"],
                "samples": total, "peak_samples": int(samples.get("peakSamples", 0)),
                "input_series": series, "samples_per_series": total / series if series else 0.0,
                "query_eval_seconds": float(stats.get("timings", {}).get("evalTotalTime", 0.0)),
                "eval_seconds": median(rule_times[(g["name"], r["name"])]),
                "result_series": len(data["result"]) if isinstance(data["result"], list) else 1,
            })
        progress(f"    {g['name']}: {len(g['rules'])} rules measured")
    return {"groups": {name: median(ts) for name, ts in group_times.items()}, "rules": rules}


def median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_size(hosts: int, days: int, polls: int, evaluation_seconds: int, compaction_timeout: float,
             progress: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wattson-rule-cost-") as tmp:
        work = Path(tmp)
        end = (time.time() // STEP_SECONDS) * STEP_SECONDS - STEP_SECONDS
        fleet = Fleet(hosts, t0=end - LIVE_HISTORY_HOURS * 3600 - 3600)
        t = time.time()
        files, samples = write_history(fleet, work, end, days)
        generated = time.time() - t
        progress(f"  {hosts} hosts: {samples:,} samples of history in {len(files)} blocks written in "
                 f"{generated:.0f} s; backfilling")
        t = time.time()
        backfill(files, work / "data")
        backfilled = time.time() - t
        with live_exposition(fleet) as port, prometheus(work / "data", work, port, evaluation_seconds) as base:
            blocks = wait_compacted(base, compaction_timeout)
            started = time.time()
            progress(f"  {hosts} hosts: backfilled in {backfilled:.0f} s, {blocks:.0f} blocks; evaluating")
            wait_for("every rule evaluated after the first scrape",
                     lambda: evaluated_groups(base, started + 2 * evaluation_seconds), timeout=600, interval=1)
            measured = measure(base, polls, evaluation_seconds, progress)
            series = api(base, "/api/v1/query", query="count({__name__=~\"wattson_[a-z0-9_]+\"})")["result"]
        return {"hosts": hosts, "history_samples": samples, "generate_seconds": generated,
                "backfill_seconds": backfilled, "blocks": blocks,
                "scraped_series": int(float(series[0]["value"][1])) if series else 0, **measured}


def extrapolate(sizes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rule, the linear fit of samples (and peak, and evaluation time) over hosts, at TARGET_HOSTS."""
    xs = [float(s["hosts"]) for s in sizes]
    out = []
    for i, rule in enumerate(sizes[-1]["rules"]):
        rows = [s["rules"][i] for s in sizes]

        def at_target(key: str, rows: list[dict[str, Any]] = rows) -> float:
            fit = fit_line(xs, [float(r[key]) for r in rows]) if len(xs) > 1 else None
            return fit.intercept + fit.slope * TARGET_HOSTS if fit else float(rows[0][key]) * TARGET_HOSTS / xs[0]

        samples = at_target("samples")
        out.append({"group": rule["group"], "rule": rule["rule"], "samples_at_target": samples,
                    "peak_at_target": at_target("peak_samples"), "eval_seconds_at_target": at_target("eval_seconds"),
                    "samples_per_series": max(r["samples_per_series"] for r in rows),
                    "over_max_samples": samples > DEFAULT_MAX_SAMPLES,
                    "over_per_series_target": max(r["samples_per_series"] for r in rows) > SAMPLES_PER_SERIES_TARGET})
    return out


def run(hosts: Sequence[int] = (25, 50), days: int = 32, polls: int = 3, evaluation_seconds: int = 15,
        compaction_timeout: float = 300.0, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every fleet size; {"error": ...} when prometheus or promtool is not installed."""
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        return {"error": f"{' and '.join(missing)} not installed (Debian: apt-get install prometheus)"}
    sizes = []
    for n in hosts:
        progress(f"  rules: {n} hosts x {GPUS} GPUs, {days} days of history at a {STEP_SECONDS} s step")
        sizes.append(run_size(n, days, polls, evaluation_seconds, compaction_timeout, progress))
    return {"hosts": list(hosts), "days": days, "gpus_per_host": GPUS, "step_seconds": STEP_SECONDS,
            "evaluation_seconds": evaluation_seconds, "target_hosts": TARGET_HOSTS,
            "samples_per_series_target": SAMPLES_PER_SERIES_TARGET, "max_samples": DEFAULT_MAX_SAMPLES,
            "prometheus": prometheus_version(), "sizes": sizes, "extrapolated": extrapolate(sizes)}


def prometheus_version() -> str | None:
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None
