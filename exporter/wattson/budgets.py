"""Budgets per scope, as configured, exported as metrics for the alerting rules.

A budget belongs to a scope: the whole fleet, a cluster, a Kubernetes namespace, a Slurm account, a user,
or one host (`instance`, the flat `budgets.*` keys). wattson only states them; the rules compare them with
the period totals (periods.py) summed over the scope. Any wattson may carry the fleet's budgets (the grid
hub's config is the natural place); the rules take one value where several state the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .config import BudgetsConfig

# scope -> the label naming its value (None: the scope has no value label).
SCOPE_LABEL: dict[str, str | None] = {
    "fleet": None, "cluster": "cluster", "namespace": "namespace", "account": "account", "user": "user",
    "instance": None,
}
CONFIG_SCOPES = ("fleet", "cluster", "namespace", "account", "user")  # entries of budgets.scopes
SCOPE_VALUE_LABELS = ("cluster", "namespace", "account", "user")
WORKLOAD_SCOPES = ("namespace", "account", "user")  # scopes wattson totals per period from workloads
INSTANCE = "instance"


@dataclass(frozen=True)
class ScopeBudget:
    """One scope's budgets: (period, amount) pairs, and a carbon intensity threshold."""

    scope: str
    value: str  # the scope's label value; "" for fleet and instance
    cost: tuple[tuple[str, float], ...] = ()  # period -> amount in Budgets.currency
    co2e_grams: tuple[tuple[str, float], ...] = ()
    intensity_threshold: float | None = None

    def labels(self) -> dict[str, str]:
        label = SCOPE_LABEL[self.scope]
        return {"scope": self.scope} | ({label: self.value} if label else {})


@dataclass(frozen=True)
class Budgets:
    """The configured budgets. The flat fields are the host's own (scope "instance")."""

    currency: str
    cost: tuple[tuple[str, float], ...]  # period -> amount
    co2e_grams: tuple[tuple[str, float], ...]
    intensity_threshold: float | None
    scopes: tuple[ScopeBudget, ...] = ()  # the `budgets.scopes` entries, in file order

    def all_scopes(self) -> tuple[ScopeBudget, ...]:
        """The host's budget first (when it sets any), then the scoped ones."""
        own = ScopeBudget(INSTANCE, "", self.cost, self.co2e_grams, self.intensity_threshold)
        has_own = self.cost or self.co2e_grams or self.intensity_threshold is not None
        return ((own,) if has_own else ()) + self.scopes


def _periods(day: float | None, month: float | None) -> tuple[tuple[str, float], ...]:
    return tuple((p, v) for p, v in (("day", day), ("month", month)) if v is not None)


def from_config(b: BudgetsConfig) -> Budgets:
    """The budgets of a validated config (config.BudgetsConfig checked every scope entry)."""
    scopes = tuple(
        ScopeBudget(s.scope, (getattr(s, label) or "") if (label := SCOPE_LABEL[s.scope]) else "",
                    _periods(s.cost_per_day, s.cost_per_month),
                    _periods(s.co2e_grams_per_day, s.co2e_grams_per_month),
                    s.carbon_intensity_threshold_grams_per_kwh)
        for s in b.scopes)
    return Budgets(currency=b.currency, cost=_periods(b.cost_per_day, b.cost_per_month),
                   co2e_grams=_periods(b.co2e_grams_per_day, b.co2e_grams_per_month),
                   intensity_threshold=b.carbon_intensity_threshold_grams_per_kwh, scopes=scopes)


def budget_metrics(b: Budgets | None) -> Iterator[Metric]:
    """wattson_budget_cost{scope,<label>,period,currency}, wattson_budget_co2e_grams{scope,<label>,period} and
    wattson_carbon_intensity_threshold_grams_per_kwh{scope,<label>}; <label> is the scope's own (cluster,
    namespace, account or user), none for fleet and instance."""
    if b is None:
        return
    cost = GaugeMetricFamily("wattson_budget_cost", "Configured spending budget per scope and period, in "
                             "currency units; scope=instance is this host's own.")
    grams = GaugeMetricFamily("wattson_budget_co2e_grams", "Configured CO2e budget per scope and period, in grams; "
                              "scope=instance is this host's own.")
    threshold = GaugeMetricFamily("wattson_carbon_intensity_threshold_grams_per_kwh", "Configured grid carbon "
                                  "intensity alert threshold per scope, gCO2e per kWh.")
    for s in b.all_scopes():
        labels = s.labels()
        for period, amount in s.cost:
            cost.add_sample("wattson_budget_cost", labels | {"period": period, "currency": b.currency}, amount)
        for period, amount in s.co2e_grams:
            grams.add_sample("wattson_budget_co2e_grams", labels | {"period": period}, amount)
        if s.intensity_threshold is not None:
            threshold.add_sample("wattson_carbon_intensity_threshold_grams_per_kwh", labels, s.intensity_threshold)
    yield cost
    yield grams
    if threshold.samples:
        yield threshold


__all__ = ["Budgets", "CONFIG_SCOPES", "SCOPE_LABEL", "SCOPE_VALUE_LABELS", "ScopeBudget", "WORKLOAD_SCOPES",
           "budget_metrics", "from_config"]
