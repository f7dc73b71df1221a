"""Cost and CO2e accounting: each energy step priced and weighted with the values in force then.

A step [t0, t1] is split across the price and carbon intervals it spans (constant power assumed
within a step), so a price change at half past prices each joule once at the right price, whatever
the sampling interval. Energy used while a signal is unknown is counted as unpriced, never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .energy import EnergyStep
from .grid.signal import GridSignals

JOULES_PER_KWH = 3_600_000.0


@dataclass
class GpuAccount:
    """Monotonic per-GPU totals. Negative prices go to `credit` so every counter only rises."""

    cost: dict[str, float] = field(default_factory=dict)  # currency -> sum of positive amounts
    credit: dict[str, float] = field(default_factory=dict)  # currency -> sum of |negative amounts|
    co2e_grams: float = 0.0
    unpriced_joules: dict[str, float] = field(default_factory=lambda: {"price": 0.0, "carbon": 0.0})

    def frozen(self) -> AccountSnapshot:
        return AccountSnapshot(tuple(sorted(self.cost.items())), tuple(sorted(self.credit.items())),
                               self.co2e_grams, tuple(sorted(self.unpriced_joules.items())))


@dataclass(frozen=True)
class AccountSnapshot:
    cost: tuple[tuple[str, float], ...] = ()
    credit: tuple[tuple[str, float], ...] = ()
    co2e_grams: float = 0.0
    unpriced_joules: tuple[tuple[str, float], ...] = (("carbon", 0.0), ("price", 0.0))


@dataclass(frozen=True)
class StepCharge:
    """What one energy step cost, for per-workload attribution (issue 6) and tests."""

    facility_joules: float
    cost: tuple[tuple[str, float], ...]  # currency -> signed amount
    co2e_grams: float
    unpriced: tuple[tuple[str, float], ...]  # signal -> joules


def charge(step: EnergyStep, grid: GridSignals, now: float) -> StepCharge:
    """Price and weigh one step. Pure: reads the chains' current immutable state only."""
    joules = step.joules * grid.pue
    cost: dict[str, float] = {}
    grams = 0.0
    unpriced: dict[str, float] = {}
    if joules == 0.0:
        return StepCharge(0.0, (), 0.0, ())
    if grid.price is not None:
        for fraction, value in grid.price.state.split(step.start, step.end, now):
            part = joules * fraction
            if value is None or value.currency is None:
                unpriced["price"] = unpriced.get("price", 0.0) + part
            else:
                cost[value.currency] = cost.get(value.currency, 0.0) + part / JOULES_PER_KWH * value.value
    else:
        unpriced["price"] = joules
    if grid.carbon is not None:
        for fraction, value in grid.carbon.state.split(step.start, step.end, now):
            part = joules * fraction
            if value is None:
                unpriced["carbon"] = unpriced.get("carbon", 0.0) + part
            else:
                grams += part / JOULES_PER_KWH * value.value
    else:
        unpriced["carbon"] = joules
    return StepCharge(joules, tuple(cost.items()), grams, tuple(unpriced.items()))


def apply(account: GpuAccount, c: StepCharge) -> None:
    for currency, amount in c.cost:
        if amount >= 0:
            account.cost[currency] = account.cost.get(currency, 0.0) + amount
        else:
            account.credit[currency] = account.credit.get(currency, 0.0) - amount
        account.cost.setdefault(currency, 0.0)
        account.credit.setdefault(currency, 0.0)
    account.co2e_grams += c.co2e_grams
    for signal, j in c.unpriced:
        account.unpriced_joules[signal] = account.unpriced_joules.get(signal, 0.0) + j
