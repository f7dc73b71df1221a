#!/usr/bin/env python3
"""wattson's Grafana dashboards, written as plain Python data and rendered to grafana/dashboards/*.json.

    python grafana/dashboards.py            # (re)write the JSON files Grafana provisions
    python grafana/dashboards.py --check    # exit 1 if a committed file differs from this source

The JSON files are what Grafana loads; this script is their source, and tests/test_dashboards.py
fails when they drift apart. panel_queries() lists every panel's PromQL with the dashboard
variables substituted, so a test can run each one through a real Prometheus.

Every panel uses the `datasource` variable; queries filter on `instance=~"$host"` and, on the GPU
dashboard, `gpu=~"$gpu"`; today and month to date (Fleet, Budget) on `offset="$offset"`, the day
boundary. Money panels carry one unit override per currency (the legend ends in
the currency code), because a Grafana unit cannot come from a label.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE_UID = "wattson-prometheus"  # grafana/provisioning/datasources/prometheus.yml
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
UTC_OFFSET = "+00:00"  # the `offset` label of UTC days and months, which every wattson exports
TAGS = ["wattson"]

# Grafana's built-in currency units (valueFormats "Currency" category).
CURRENCY_UNITS = {
    "USD": "currencyUSD", "EUR": "currencyEUR", "GBP": "currencyGBP", "JPY": "currencyJPY",
    "CHF": "currencyCHF", "SEK": "currencySEK", "NOK": "currencyNOK", "DKK": "currencyDKK",
    "ISK": "currencyISK", "PLN": "currencyPLN", "CZK": "currencyCZK", "BRL": "currencyBRL",
    "ZAR": "currencyZAR", "INR": "currencyINR", "KRW": "currencyKRW",
}
MONEY = "money"  # pseudo-unit: "short" plus the per-currency overrides
GRAMS_PER_KWH = "suffix:g/kWh"
SHARE_STEPS = [(None, "green"), (0.8, "orange"), (1.0, "red")]

HOST = 'instance=~"$host"'
HOST_GPU = 'instance=~"$host", gpu=~"$gpu"'
# Today and month to date at the day boundary the `offset` variable picks (+00:00 is UTC).
HOST_OFFSET = 'instance=~"$host", offset="$offset"'
# The labels that name a budget scope (prometheus/rules/wattson-recording.yml, level `scope`).
SCOPE_KEYS = "scope, cluster, job, instance, namespace, account, user"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass(frozen=True)
class Panel:
    kind: str  # timeseries, stat, gauge, bargauge, table
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 6
    height: int = 6
    min: float | None = None
    max: float | None = None
    steps: list[tuple[float | None, str]] | None = None
    mappings: dict[str, tuple[str, str]] | None = None  # value -> (text, color)


@dataclass(frozen=True)
class TextVariable:
    """A free-text dashboard variable (Grafana's textbox) and the value a fresh dashboard starts with."""

    name: str
    label: str
    default: str
    description: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    time_from: str = "now-24h"
    text_variables: tuple[TextVariable, ...] = ()
    offset_variable: bool = False  # today and month to date: which day boundary (UTC or a configured offset)

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


def q(expr: str, legend: str = "", instant: bool = False, table: bool = False) -> Query:
    return Query(" ".join(expr.split()), legend, instant, table)


UP_DOWN = {"1": ("up", "green"), "0": ("down", "red")}

FLEET = Dashboard(
    uid="wattson-fleet",
    title="wattson / Fleet overview",
    description="Power, energy, cost and CO2e of the GPU fleet now, today and this month, against the fleet's and "
                "the hosts' budgets. Days and months start at the chosen day boundary (UTC or a configured offset).",
    offset_variable=True,
    panels=(
        Panel("stat", "GPU power now", "Power drawn by the GPUs of the selected hosts now, as NVML reports it "
              "(without PUE).", "watt",
              (q(f"sum(instance:wattson_gpu_power_watts:sum{{{HOST}}})", "GPU power"),), width=4, height=4),
        Panel("stat", "Facility power now", "GPU power times each host's PUE: the power that cost and CO2e are "
              "computed from.", "watt",
              (q(f"sum(instance:wattson_facility_power_watts:sum{{{HOST}}})", "GPU power x PUE"),), width=4, height=4),
        Panel("stat", "GPUs", "Number of GPUs wattson exports on the selected hosts.", "none",
              (q(f"sum(instance:wattson_gpu_info:count{{{HOST}}})", "GPUs"),), width=4, height=4),
        Panel("stat", "GPU energy today", "GPU energy since the start of the day (at the chosen day boundary), "
              "without PUE, from wattson's own period totals.", "kwatth",
              (q(f"sum(instance:wattson_gpu_energy_joules:today{{{HOST_OFFSET}}}) / 3.6e6", "today"),),
              width=4, height=4),
        Panel("stat", "GPU energy this month", "GPU energy since the 1st of the month (at the chosen day boundary), "
              "without PUE.", "kwatth",
              (q(f"sum(instance:wattson_gpu_energy_joules:month_to_date{{{HOST_OFFSET}}}) / 3.6e6", "this month"),),
              width=4, height=4),
        Panel("stat", "Cost per GPU-hour", "Net electricity cost of one GPU for one hour, averaged over the last "
              "hour and the selected hosts, per currency.", MONEY,
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost_per_hour:rate1h{{{HOST}}}) / sum by (currency) "
                 f"(count by (cluster, job, instance, currency) (wattson_gpu_cost_total{{{HOST}}}))", "{{currency}}"),),
              width=4, height=4),
        Panel("stat", "Cost today", "Net electricity cost (cost minus credits earned at negative prices) since the "
              "start of the day, per currency, PUE included.", MONEY,
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost:today{{{HOST_OFFSET}}})", "{{currency}}"),)),
        Panel("stat", "Cost this month", "Net electricity cost since the 1st of the month, per currency.", MONEY,
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost:month_to_date{{{HOST_OFFSET}}})",
                 "{{currency}}"),)),
        Panel("gauge", "Cost today, share of daily budget", "Today's net cost of the selected hosts divided by the "
              "fleet's daily budget (budgets.scopes, scope fleet), and the cost of the hosts that have a daily "
              "budget of their own (budgets.cost_per_day) divided by the sum of those budgets.", "percentunit",
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost:today{{{HOST_OFFSET}}}) / on (currency) "
                 f"group_left () scope:wattson_budget_cost:max{{scope=\"fleet\", period=\"day\"}}",
                 "fleet {{currency}}"),
               q(f"sum by (currency) (instance:wattson_gpu_net_cost:today{{{HOST_OFFSET}}} and on (cluster, job, "
                 f"instance, currency) scope:wattson_budget_cost:max{{scope=\"instance\", period=\"day\"}}) / sum by "
                 f"(currency) (scope:wattson_budget_cost:max{{scope=\"instance\", period=\"day\", {HOST}}})",
                 "hosts {{currency}}")),
              min=0, max=1.5, steps=SHARE_STEPS),
        Panel("gauge", "Cost this month, share of budget", "This month's net cost of the selected hosts divided by "
              "the fleet's monthly budget, and the cost of the hosts that have a monthly budget of their own "
              "(budgets.cost_per_month) divided by the sum of those budgets.", "percentunit",
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost:month_to_date{{{HOST_OFFSET}}}) / on (currency) "
                 f"group_left () scope:wattson_budget_cost:max{{scope=\"fleet\", period=\"month\"}}",
                 "fleet {{currency}}"),
               q(f"sum by (currency) (instance:wattson_gpu_net_cost:month_to_date{{{HOST_OFFSET}}} and on (cluster, "
                 f"job, instance, currency) scope:wattson_budget_cost:max{{scope=\"instance\", period=\"month\"}}) / "
                 f"sum by (currency) (scope:wattson_budget_cost:max{{scope=\"instance\", period=\"month\", {HOST}}})",
                 "hosts {{currency}}")),
              min=0, max=1.5, steps=SHARE_STEPS),
        Panel("stat", "CO2e today", "Emissions since the start of the day: energy x PUE x grid carbon intensity at "
              "the time.", "massg", (q(f"sum(instance:wattson_gpu_co2e_grams:today{{{HOST_OFFSET}}})", "today"),)),
        Panel("stat", "CO2e this month", "Emissions since the 1st of the month.", "massg",
              (q(f"sum(instance:wattson_gpu_co2e_grams:month_to_date{{{HOST_OFFSET}}})", "this month"),)),
        Panel("gauge", "CO2e this month, share of budget", "This month's emissions of the selected hosts divided by "
              "the fleet's monthly CO2e budget, and those of the hosts with a monthly CO2e budget of their own "
              "(budgets.co2e_grams_per_month) divided by the sum of those budgets.", "percentunit",
              (q(f"sum(instance:wattson_gpu_co2e_grams:month_to_date{{{HOST_OFFSET}}}) / on () group_left () "
                 f"scope:wattson_budget_co2e_grams:max{{scope=\"fleet\", period=\"month\"}}", "fleet"),
               q(f"sum(instance:wattson_gpu_co2e_grams:month_to_date{{{HOST_OFFSET}}} and on (cluster, job, instance) "
                 f"scope:wattson_budget_co2e_grams:max{{scope=\"instance\", period=\"month\"}}) / "
                 f"sum(scope:wattson_budget_co2e_grams:max{{scope=\"instance\", period=\"month\", {HOST}}})",
                 "hosts")),
              min=0, max=1.5, steps=SHARE_STEPS),
        Panel("bargauge", "Top hosts by cost this month", "The ten hosts with the highest net cost this month, per "
              "currency.", MONEY,
              (q(f"topk by (currency) (10, instance:wattson_gpu_net_cost:month_to_date{{{HOST_OFFSET}}})",
                 "{{instance}} {{currency}}", instant=True),), width=6, height=8),
        Panel("bargauge", "Cost this month by cluster", "Net cost this month of the selected hosts in each cluster "
              "(the `cluster` label of the scrape or of Prometheus's external labels; hosts without one are left "
              "out).", MONEY,
              (q(f"sum by (cluster, currency) (instance:wattson_gpu_net_cost:month_to_date{{{HOST_OFFSET}, "
                 f"cluster!=\"\"}})", "{{cluster}} {{currency}}", instant=True),), width=6, height=8),
        Panel("timeseries", "Cost rate (per hour)", "Net cost per hour at the 5-minute burn rate, per currency.",
              MONEY,
              (q(f"sum by (currency) (instance:wattson_gpu_net_cost_per_hour:rate5m{{{HOST}}})", "{{currency}}"),),
              width=12, height=8),
        Panel("timeseries", "Emissions rate (per hour)", "Grams of CO2e emitted per hour at the 5-minute rate.",
              "massg",
              (q(f"sum(instance:wattson_gpu_co2e_grams_per_hour:rate5m{{{HOST}}})", "CO2e per hour"),),
              width=12, height=8),
        Panel("timeseries", "GPU power by host", "Summed GPU power of each host.", "watt",
              (q(f"instance:wattson_gpu_power_watts:sum{{{HOST}}}", "{{instance}}"),), width=12, height=8),
        Panel("timeseries", "Cost per GPU-hour by host", "Net cost of one GPU for one hour on each host, over the "
              "last hour.", MONEY,
              (q(f"instance:wattson_gpu_net_cost_per_gpu_hour:rate1h{{{HOST}}}", "{{instance}} {{currency}}"),),
              width=12, height=8),
    ),
)

GPU = Dashboard(
    uid="wattson-gpu",
    title="wattson / GPU detail",
    description="Per-GPU power against its limit, energy, memory, utilization, cost and CO2e.",
    time_from="now-6h",
    panels=(
        Panel("timeseries", "Power and power limit", "Power each GPU draws and the power limit the driver enforces.",
              "watt",
              (q(f"wattson_gpu_power_watts{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}}"),
               q(f"wattson_gpu_power_limit_watts{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}} limit")),
              width=12, height=8),
        Panel("timeseries", "Power, share of limit", "Power divided by the enforced power limit.", "percentunit",
              (q(f"wattson_gpu_power_watts{{{HOST_GPU}}} / wattson_gpu_power_limit_watts{{{HOST_GPU}}}",
                 "{{instance}} GPU {{gpu}}"),), width=12, height=8, min=0, max=1),
        Panel("timeseries", "Utilization", "Share of time a kernel was running on the GPU (NVML).", "percentunit",
              (q(f"wattson_gpu_utilization_ratio{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}}"),),
              width=12, height=8, min=0, max=1),
        Panel("timeseries", "Memory used and total", "GPU memory in use and installed.", "bytes",
              (q(f"wattson_gpu_memory_used_bytes{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}} used"),
               q(f"wattson_gpu_memory_total_bytes{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}} total")),
              width=12, height=8),
        Panel("bargauge", "GPU energy over the time range", "Energy each GPU used over the dashboard's time range "
              "(without PUE).", "joule",
              (q(f"increase(wattson_gpu_energy_joules_total{{{HOST_GPU}}}[$__range])", "{{instance}} GPU {{gpu}}",
                 instant=True),), width=8, height=8),
        Panel("timeseries", "Cost rate per GPU (per hour)", "Net cost per hour of each GPU, PUE included.", MONEY,
              (q(f"3600 * (rate(wattson_gpu_cost_total{{{HOST_GPU}}}[$__rate_interval]) - "
                 f"rate(wattson_gpu_cost_credit_total{{{HOST_GPU}}}[$__rate_interval]))",
                 "{{instance}} GPU {{gpu}} {{currency}}"),), width=8, height=8),
        Panel("timeseries", "CO2e rate per GPU (per hour)", "Grams of CO2e per hour of each GPU, PUE included.",
              "massg",
              (q(f"3600 * rate(wattson_gpu_co2e_grams_total{{{HOST_GPU}}}[$__rate_interval])",
                 "{{instance}} GPU {{gpu}}"),), width=8, height=8),
        Panel("stat", "GPU readable", "Whether wattson's last read of each GPU succeeded (wattson_gpu_up).", "none",
              (q(f"wattson_gpu_up{{{HOST_GPU}}}", "{{instance}} GPU {{gpu}}"),), width=8, height=6,
              mappings=UP_DOWN),
        Panel("timeseries", "Sampler errors", "Failed GPU reads by reason, per sampling window.", "none",
              (q(f"sum by (instance, gpu, error) (increase(wattson_sampler_errors_total{{{HOST_GPU}}}"
                 f"[$__rate_interval]))", "{{instance}} GPU {{gpu}} {{error}}"),), width=16, height=6),
        Panel("table", "GPU identity", "Model, UUID, PCI bus, driver, energy method and backend of each GPU.",
              "none", (q(f"wattson_gpu_info{{{HOST_GPU}}}", instant=True, table=True),), width=24, height=6),
    ),
)

GRID = Dashboard(
    uid="wattson-grid",
    title="wattson / Grid",
    description="Electricity price and grid carbon intensity over time, their sources and data age, and what "
                "was actually paid.",
    time_from="now-2d",
    panels=(
        Panel("timeseries", "Electricity price (per kWh)", "Price in force, retail adjustments included.", MONEY,
              (q(f"wattson_electricity_price_per_kwh{{{HOST}}}", "{{instance}} {{zone}} {{currency}}"),),
              width=12, height=8),
        Panel("timeseries", "Grid carbon intensity", "Grid carbon intensity in force, gCO2e per kWh.", GRAMS_PER_KWH,
              (q(f"wattson_grid_carbon_intensity_grams_per_kwh{{{HOST}}}", "{{instance}} {{zone}}"),),
              width=12, height=8),
        Panel("timeseries", "Price paid (per kWh, energy-weighted, last hour)", "Net cost of the last hour divided "
              "by the energy x PUE that had a price: an hour at full load weighs more than an idle one.", MONEY,
              (q(f"instance:wattson_price_paid_per_kwh:avg1h{{{HOST}}}", "{{instance}} {{currency}}"),),
              width=12, height=8),
        Panel("timeseries", "Carbon intensity paid (energy-weighted, last hour)", "CO2e of the last hour divided by "
              "the energy x PUE that had a known intensity.", GRAMS_PER_KWH,
              (q(f"instance:wattson_carbon_intensity_paid_grams_per_kwh:avg1h{{{HOST}}}", "{{instance}}"),),
              width=12, height=8),
        Panel("table", "Active sources", "The source serving each signal now, and whether its value is an "
              "estimate.", "none",
              (q(f"wattson_grid_signal_info{{{HOST}}}", instant=True, table=True),), width=12, height=6),
        Panel("timeseries", "Data age", "Seconds since the data in use was fetched. The WattsonGridSignalStale alert "
              "fires above 5400 s.", "s",
              (q(f"wattson_grid_signal_age_seconds{{{HOST}}}", "{{instance}} {{signal}} {{zone}}"),),
              width=12, height=6),
        Panel("stat", "Source status", "Whether the last fetch from each source succeeded (wattson_source_up).",
              "none", (q(f"wattson_source_up{{{HOST}}}", "{{instance}} {{signal}} {{source}}"),), width=8, height=6,
              mappings=UP_DOWN),
        Panel("timeseries", "Source errors", "Failed or rejected fetches per window, by signal, source and reason.",
              "none",
              (q(f"sum by (instance, signal, source, reason) (increase(wattson_source_errors_total{{{HOST}}}"
                 f"[$__rate_interval]))", "{{instance}} {{signal}} {{source}} {{reason}}"),), width=8, height=6),
        Panel("timeseries", "Energy with no price or intensity", "Energy x PUE used while no price (or no carbon "
              "intensity) was known, per window: counted here instead of being priced at 0.", "joule",
              (q(f"sum by (instance, signal) (increase(wattson_gpu_unpriced_energy_joules_total{{{HOST}}}"
                 f"[$__rate_interval]))", "{{instance}} {{signal}}"),), width=8, height=6),
        Panel("stat", "PUE", "Power usage effectiveness applied to GPU energy for cost and CO2e.", "none",
              (q(f"wattson_pue{{{HOST}}}", "{{instance}}"),), width=24, height=4),
        Panel("bargauge", "Best window starts in", "How long until the window of each length (grid.forecast.windows) "
              "with the lowest average carbon intensity or price starts, in the data of the source serving the "
              "signal now; 0 = now. No bar where those data do not reach that far ahead.", "s",
              (q(f"clamp_min(wattson_grid_best_window_start_timestamp_seconds{{{HOST}}} - time(), 0)",
                 "{{instance}} {{signal}} {{window}}", instant=True),), width=8, height=8),
        Panel("bargauge", "Carbon intensity now and in the best window", "Grid carbon intensity in force now and "
              "its average over the best window of each length.", GRAMS_PER_KWH,
              (q(f"wattson_grid_carbon_intensity_grams_per_kwh{{{HOST}}}", "{{instance}} {{zone}} now", instant=True),
               q(f"wattson_grid_carbon_intensity_best_window_grams_per_kwh{{{HOST}}}",
                 "{{instance}} {{zone}} best {{window}}", instant=True)), width=8, height=8),
        Panel("bargauge", "Price now and in the best window", "Electricity price in force now and its average over "
              "the best window of each length, retail adjustments included.", MONEY,
              (q(f"wattson_electricity_price_per_kwh{{{HOST}}}", "{{instance}} {{zone}} now {{currency}}",
                 instant=True),
               q(f"wattson_electricity_price_best_window_per_kwh{{{HOST}}}",
                 "{{instance}} {{zone}} best {{window}} {{currency}}", instant=True)), width=8, height=8),
        Panel("bargauge", "Saving for a job of $job_kwh kWh: cost", "What a job of $job_kwh kWh (the variable above) "
              "saves by running in the best window of each length rather than at today's price: (price now - "
              "best-window price) x kWh. Negative: now is cheaper.", MONEY,
              (q(f"(wattson_electricity_price_per_kwh{{{HOST}}} - on (job, instance, zone, currency) group_right "
                 f"wattson_electricity_price_best_window_per_kwh{{{HOST}}}) * $job_kwh",
                 "{{instance}} {{window}} {{currency}}", instant=True),), width=12, height=8),
        Panel("bargauge", "Saving for a job of $job_kwh kWh: CO2e", "Grams of CO2e a job of $job_kwh kWh saves by "
              "running in the best window of each length rather than now: (intensity now - best-window intensity) "
              "x kWh. Negative: now is cleaner.", "massg",
              (q(f"(wattson_grid_carbon_intensity_grams_per_kwh{{{HOST}}} - on (job, instance, zone) group_right "
                 f"wattson_grid_carbon_intensity_best_window_grams_per_kwh{{{HOST}}}) * $job_kwh",
                 "{{instance}} {{window}}", instant=True),), width=12, height=8),
    ),
    text_variables=(TextVariable("job_kwh", "Job energy (kWh)", "100", "Energy of the job the saving panels "
                                 "price, in kWh (GPU energy x PUE)."),),
)

# Budget panels: a scope's spend and budget are both scope:... rules. A host's own (scope instance) follow
# the host variable; the wider scopes (cluster, fleet, namespace, account, user) have no instance label
# and always show.
SCOPE_HOST = f'scope="instance", {HOST_OFFSET}'
SCOPE_WIDER = 'scope!="instance", instance=~"$host|", offset="$offset"'
WIDER_LEGEND = "{{scope}} {{cluster}}{{namespace}}{{account}}{{user}}"


def over_budget(rule: str, budget: str, period: str, money: bool = True) -> tuple[Query, ...]:
    """A scope's spend (or emissions) divided by its budget: the selected hosts' own, then the wider scopes."""
    on = SCOPE_KEYS + (", currency" if money else "")
    cur = " {{currency}}" if money else ""
    return tuple(q(f"{rule}{{{sel}}} / on ({on}) group_left () {budget}{{period=\"{period}\"}}", legend + cur,
                   instant=True)
                 for sel, legend in ((SCOPE_HOST, "{{instance}}"), (SCOPE_WIDER, WIDER_LEGEND)))


def with_budget(rule: str, budget: str, period: str, what: str, money: bool = True) -> tuple[Query, ...]:
    """A scope's spend (or emissions) over time, for the scopes that have a budget, and that budget."""
    on = SCOPE_KEYS + (", currency" if money else "")
    cur = " {{currency}}" if money else ""
    spent = tuple(q(f"{rule}{{{sel}}} and on ({on}) {budget}{{period=\"{period}\"}}", f"{legend} {what}{cur}")
                  for sel, legend in ((SCOPE_HOST, "{{instance}}"), (SCOPE_WIDER, WIDER_LEGEND)))
    return spent + (q(f"{budget}{{period=\"{period}\", instance=~\"$host|\"}}",
                      f"{{{{scope}}}} {{{{instance}}}}{{{{cluster}}}}{{{{namespace}}}}{{{{account}}}}{{{{user}}}} "
                      f"budget{cur}"),)


BUDGET = Dashboard(
    uid="wattson-budget",
    title="wattson / Budget",
    description="Spend and emissions today and this month against the budget of each scope (a host's own, a "
                "cluster's, the fleet's, a namespace's, a Slurm account's, a user's), the month-end forecast and "
                "the state of the wattson alerts. The host variable selects hosts' own budgets; the wider scopes "
                "always show.",
    time_from="now-7d",
    offset_variable=True,
    panels=(
        Panel("bargauge", "Spent this month, share of budget", "Each scope's net cost since the 1st divided by its "
              "monthly budget: the selected hosts' own (budgets.cost_per_month) and those of budgets.scopes "
              "(cluster, fleet, namespace, account, user).", "percentunit",
              over_budget("scope:wattson_gpu_net_cost:month_to_date", "scope:wattson_budget_cost:max", "month"),
              width=8, height=8, min=0, max=1.5, steps=SHARE_STEPS),
        Panel("bargauge", "Month-end forecast, share of budget", "Each scope's spend by the end of the month at the "
              "burn rate of the last 6 hours, divided by its monthly budget.", "percentunit",
              over_budget("scope:wattson_gpu_net_cost:month_end_forecast6h", "scope:wattson_budget_cost:max",
                          "month"),
              width=8, height=8, min=0, max=1.5, steps=SHARE_STEPS),
        Panel("bargauge", "Spent today, share of daily budget", "Each scope's net cost since the start of the day "
              "divided by its daily budget.", "percentunit",
              over_budget("scope:wattson_gpu_net_cost:today", "scope:wattson_budget_cost:max", "day"),
              width=8, height=8, min=0, max=1.5, steps=SHARE_STEPS),
        Panel("timeseries", "Spent this month and budget", "Net cost since the 1st of each scope that has a monthly "
              "budget, and that budget.", MONEY,
              with_budget("scope:wattson_gpu_net_cost:month_to_date", "scope:wattson_budget_cost:max", "month",
                          "spent"),
              width=12, height=8),
        Panel("timeseries", "Month-end forecast", "Spend by the end of the month: spent so far plus the burn rate of "
              "the last 6 hours (and of the last hour) times the time left, for each scope with a monthly budget; "
              "against that budget.", MONEY,
              with_budget("scope:wattson_gpu_net_cost:month_end_forecast6h", "scope:wattson_budget_cost:max",
                          "month", "at the 6h burn rate")
              + with_budget("scope:wattson_gpu_net_cost:month_end_forecast1h", "scope:wattson_budget_cost:max",
                            "month", "at the 1h burn rate")[:2],
              width=12, height=8),
        Panel("timeseries", "CO2e this month and budget", "Emissions since the 1st of each scope that has a monthly "
              "CO2e budget, and that budget.", "massg",
              with_budget("scope:wattson_gpu_co2e_grams:month_to_date", "scope:wattson_budget_co2e_grams:max",
                          "month", "emitted", money=False),
              width=12, height=8),
        Panel("bargauge", "CO2e this month, share of budget", "Each scope's emissions since the 1st divided by its "
              "monthly CO2e budget.", "percentunit",
              over_budget("scope:wattson_gpu_co2e_grams:month_to_date", "scope:wattson_budget_co2e_grams:max",
                          "month", money=False),
              width=12, height=8, min=0, max=1.5, steps=SHARE_STEPS),
        Panel("table", "Alerts", "wattson alerts pending or firing now (Prometheus's ALERTS series); the ones "
              "without a host (scopes wider than a host, WattsonAbsent) always show.", "none",
              (q('ALERTS{alertname=~"Wattson[A-Za-z0-9]+", instance=~"$host|"}', instant=True, table=True),),
              width=24, height=8),
    ),
)

WL_REAL = 'kind!~"idle|unattributed|overflow"'

WORKLOADS = Dashboard(
    uid="wattson-workloads",
    title="wattson / Workloads",
    description="Energy, cost and CO2e per process, container, Kubernetes pod, Slurm job and user, for chargeback "
                "(needs workloads.enabled: true).",
    time_from="now-24h",
    panels=(
        Panel("bargauge", "Top workloads by cost", "The ten workloads (job, pod, container, user) with the highest "
              "net cost over the time range, per currency; PUE included.", MONEY,
              (q(f"topk by (currency) (10, sum by (kind, workload, currency) (increase(wattson_workload_cost_total"
                 f"{{{HOST}, {WL_REAL}}}[$__range])) - sum by (kind, workload, currency) (increase("
                 f"wattson_workload_cost_credit_total{{{HOST}, {WL_REAL}}}[$__range])))",
                 "{{kind}} {{workload}} {{currency}}", instant=True),), width=12, height=8),
        Panel("bargauge", "Top workloads by CO2e", "The ten workloads that emitted the most CO2e over the time "
              "range.", "massg",
              (q(f"topk(10, sum by (kind, workload) (increase(wattson_workload_co2e_grams_total{{{HOST}, {WL_REAL}}}"
                 f"[$__range])))", "{{kind}} {{workload}}", instant=True),), width=12, height=8),
        Panel("timeseries", "Cost rate per workload (per hour)", "Net cost per hour of each workload at the 5-minute "
              "rate.", MONEY,
              (q(f"3600 * sum by (kind, workload, currency) (instance_kind_workload_currency:"
                 f"wattson_workload_net_cost:rate5m{{{HOST}}})", "{{kind}} {{workload}} {{currency}}"),),
              width=12, height=8),
        Panel("timeseries", "Power per workload", "GPU power attributed to each workload (energy rate, without "
              "PUE); idle and unattributed power shown as such.", "watt",
              (q(f"sum by (kind, workload) (instance_kind_workload:wattson_workload_energy_joules:rate5m{{{HOST}}})",
                 "{{kind}} {{workload}}"),), width=12, height=8),
        Panel("bargauge", "Cost by namespace", "Net cost of Kubernetes pods per namespace over the time range.", MONEY,
              (q(f"sum by (namespace, currency) ((increase(wattson_workload_cost_total{{{HOST}, kind=\"pod\"}}"
                 f"[$__range]) - increase(wattson_workload_cost_credit_total{{{HOST}, kind=\"pod\"}}[$__range])) "
                 f"* on (instance, kind, workload) group_left (namespace) max by (instance, kind, workload, "
                 f"namespace) (wattson_workload_info{{{HOST}, kind=\"pod\", namespace!=\"\"}}))",
                 "{{namespace}} {{currency}}", instant=True),), width=8, height=8),
        Panel("bargauge", "Cost by user", "Net cost per Unix user (Slurm job owners, bare processes, container "
              "users) over the time range.", MONEY,
              (q(f"sum by (user, currency) ((increase(wattson_workload_cost_total{{{HOST}}}[$__range]) - "
                 f"increase(wattson_workload_cost_credit_total{{{HOST}}}[$__range])) * on (instance, kind, workload) "
                 f"group_left (user) max by (instance, kind, workload, user) (wattson_workload_info{{{HOST}, "
                 f"user!=\"\"}}))", "{{user}} {{currency}}", instant=True),), width=8, height=8),
        Panel("bargauge", "CO2e by user", "Emissions per Unix user over the time range.", "massg",
              (q(f"sum by (user) (increase(wattson_workload_co2e_grams_total{{{HOST}}}[$__range]) * on (instance, "
                 f"kind, workload) group_left (user) max by (instance, kind, workload, user) (wattson_workload_info"
                 f"{{{HOST}, user!=\"\"}}))", "{{user}}", instant=True),), width=8, height=8),
        Panel("stat", "Idle and unattributed energy", "Share of GPU energy over the time range that no running "
              "process was charged for (idle GPUs, processes wattson could not see, series over the cap).",
              "percentunit",
              (q(f"sum(increase(wattson_workload_energy_joules_total{{{HOST}, kind=~\"idle|unattributed|overflow\"}}"
                 f"[$__range])) / sum(increase(wattson_workload_energy_joules_total{{{HOST}}}[$__range]))",
                 "idle + unattributed"),), width=8, height=6, min=0, max=1),
        Panel("stat", "Workload series", "Workload series wattson exports now (capped by workloads.max_series).",
              "none", (q(f"wattson_workload_series{{{HOST}}}", "{{instance}}"),), width=8, height=6),
        Panel("table", "Attribution method per GPU", "How each GPU's energy is split: by SM utilization, memory, "
              "equal shares, or MIG instance memory.", "none",
              (q(f"wattson_workload_attribution_info{{{HOST}}}", instant=True, table=True),), width=8, height=6),
        Panel("table", "Workloads", "Each workload's kind, id, user, pod and namespace.", "none",
              (q(f"wattson_workload_info{{{HOST}}}", instant=True, table=True),), width=24, height=8),
    ),
)

DASHBOARDS = (FLEET, GPU, GRID, BUDGET, WORKLOADS)


# --- rendering -------------------------------------------------------------------------------------

def _text_variable(v: TextVariable) -> dict[str, Any]:
    return {"name": v.name, "label": v.label, "description": v.description, "type": "textbox", "query": v.default,
            "current": {"selected": False, "text": v.default, "value": v.default},
            "options": [{"selected": True, "text": v.default, "value": v.default}], "hide": 0, "skipUrlSync": False}


def _variables(offset: bool = False) -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, sort: int, multi: bool = True,
                  current: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
            "refresh": 2, "sort": sort, "multi": multi, "includeAll": multi,
        }
        if multi:
            out |= {"allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
        else:
            out["current"] = {"selected": True, "text": current, "value": current}
        return out | {"hide": 0, "regex": "", "options": [], "skipUrlSync": False}
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {"selected": False, "text": "Prometheus", "value": DATASOURCE_UID},
         "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False,
         "skipUrlSync": False},
        query_var("host", "Host", "label_values(wattson_build_info, instance)", sort=1),  # alphabetical
        query_var("gpu", "GPU", 'label_values(wattson_gpu_info{instance=~"$host"}, gpu)', sort=3),  # numerical
    ]
    if offset:
        # Today and month to date start at midnight UTC (+00:00), or at the offset hosts are configured with.
        variables.append(query_var("offset", "Day boundary (UTC offset)",
                                   'label_values(wattson_period_start_timestamp_seconds{instance=~"$host"}, offset)',
                                   sort=1, multi=False, current=UTC_OFFSET))
    return variables


def _thresholds(steps: list[tuple[float | None, str]] | None) -> dict[str, Any]:
    steps = steps or [(None, "green")]
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for value, color in steps]}


def _field_config(p: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": "short" if p.unit == MONEY else p.unit, "thresholds": _thresholds(p.steps),
        "color": {"mode": "thresholds" if p.steps or p.mappings else "palette-classic"},
    }
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    if p.mappings:
        defaults["mappings"] = [{"type": "value", "options": {
            value: {"text": text, "color": color, "index": i} for i, (value, (text, color)) in
            enumerate(sorted(p.mappings.items()))}}]
    else:
        defaults["mappings"] = []
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": False}
    overrides = []
    if p.unit == MONEY:
        overrides = [{"matcher": {"id": "byRegexp", "options": f"/(^|\\s){code}$/"},
                      "properties": [{"id": "unit", "value": unit}]} for code, unit in CURRENCY_UNITS.items()]
    return {"defaults": defaults, "overrides": overrides}


def _options(p: Panel) -> dict[str, Any]:
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if p.kind == "timeseries":
        return {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"}}
    if p.kind == "stat":
        return {"reduceOptions": reduce, "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                "orientation": "auto", "textMode": "auto"}
    if p.kind == "gauge":
        return {"reduceOptions": reduce, "showThresholdMarkers": True, "showThresholdLabels": False}
    if p.kind == "bargauge":
        return {"reduceOptions": reduce, "orientation": "horizontal", "displayMode": "gradient",
                "showUnfilled": True}
    if p.kind == "table":
        return {"showHeader": True, "cellHeight": "sm"}
    raise ValueError(f"panel {p.title!r}: unknown kind {p.kind!r}")


def _targets(p: Panel) -> list[dict[str, Any]]:
    out = []
    for i, query in enumerate(p.queries):
        out.append({
            "refId": chr(ord("A") + i), "datasource": DATASOURCE, "editorMode": "code", "expr": query.expr,
            "legendFormat": query.legend or "__auto", "range": not query.instant, "instant": query.instant,
            "format": "table" if query.table else "time_series",
        })
    return out


def _panel(p: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id, "type": p.kind, "title": p.title, "description": p.description,
        "datasource": DATASOURCE, "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": _field_config(p), "options": _options(p), "targets": _targets(p),
    }
    if p.kind == "table":
        out["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True}, "renameByName": {}}}]
    return out


def render(d: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard JSON model of one dashboard."""
    panels = []
    x = y = row_height = 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(p, i, x, y))
        x += p.width
        row_height = max(row_height, p.height)
    return {
        "uid": d.uid, "title": d.title, "description": d.description, "tags": list(TAGS),
        "editable": False, "graphTooltip": 1, "timezone": "utc", "refresh": "1m",
        "time": {"from": d.time_from, "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "weekStart": "",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": False, "includeVars": True,
                   "keepTime": True, "title": "wattson", "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "templating": {"list": _variables(d.offset_variable) + [_text_variable(v) for v in d.text_variables]},
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text, exactly as committed under grafana/dashboards/."""
    return {d.filename: json.dumps(render(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS}


# --- queries with variables substituted ----------------------------------------------------------

@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # dashboard uid
    panel: str  # panel title
    ref_id: str
    expr: str  # PromQL with every variable substituted
    instant: bool


_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def grafana_regex_value(value: str) -> str:
    """A value as Grafana's Prometheus data source writes a multi-value variable into a regex matcher
    (prometheusSpecialRegexEscape): regex metacharacters escaped, inside a PromQL string literal."""
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name and ${name} for the given variables; ValueError if any other variable is left."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise ValueError(f"query {expr!r}: no value for variable ${name}")
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def panel_queries(host: str | None = None, gpu: str | None = None, range_: str = "1h",
                  rate_interval: str = "1m", offset: str = UTC_OFFSET) -> list[PanelQuery]:
    """Every query of every dashboard panel, with $host and $gpu set to one value each (None: All,
    i.e. ".*"), $offset to one day boundary (a single-value variable, written as it is), $__range /
    $__rate_interval to the given durations and text variables to their defaults."""
    variables = {
        "host": ".*" if host is None else grafana_regex_value(host),
        "gpu": ".*" if gpu is None else grafana_regex_value(gpu),
        "offset": offset,
        "__range": range_, "__rate_interval": rate_interval, "__interval": rate_interval,
    }
    out = []
    for d in DASHBOARDS:
        values = {**variables, **{v.name: v.default for v in d.text_variables}}
        for p in d.panels:
            for i, query in enumerate(p.queries):
                out.append(PanelQuery(d.uid, p.title, chr(ord("A") + i), substitute(query.expr, values),
                                      query.instant))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed JSON file differs")
    args = parser.parse_args(argv)
    wanted = render_all()
    if args.check:
        stale = [name for name, text in wanted.items()
                 if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text]
        extra = sorted(p.name for p in OUT_DIR.glob("*.json") if p.name not in wanted)
        for name in stale:
            print(f"grafana/dashboards/{name}: differs from grafana/dashboards.py; run python grafana/dashboards.py",
                  file=sys.stderr)
        for name in extra:
            print(f"grafana/dashboards/{name}: not generated by grafana/dashboards.py", file=sys.stderr)
        return 1 if stale or extra else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in wanted.items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
