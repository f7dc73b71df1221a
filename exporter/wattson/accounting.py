"""Cost and CO2e accounting: each energy step priced and weighted with the values in force then.

A step [t0, t1] is split across the price and carbon intervals it spans (constant power assumed
within a step), so a price change at half past prices each joule once at the right price, whatever
the sampling interval. Energy used while a signal is unknown is counted as unpriced, never as 0; a
signal configured as null is disabled: nothing is priced or counted as unpriced for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .energy import EnergyStep
from .grid.signal import ChainState, GridSignals, Value

JOULES_PER_KWH = 3_600_000.0


@dataclass
class GpuAccount:
    """Monotonic per-GPU totals. Negative prices go to `credit` so every counter only rises."""

    cost: dict[str, float] = field(default_factory=dict)  # currency -> sum of positive amounts
    credit: dict[str, float] = field(default_factory=dict)  # currency -> sum of |negative amounts|
    co2e_grams: float = 0.0
    unpriced_joules: dict[str, float] = field(default_factory=lambda: {"price": 0.0, "carbon": 0.0})

    def restore(self, cost: dict[str, float], credit: dict[str, float], co2e_grams: float,
                unpriced_joules: dict[str, float]) -> None:
        """Continue totals saved by a previous run."""
        self.cost = dict(cost)
        self.credit = dict(credit)
        for currency in set(cost) | set(credit):
            self.cost.setdefault(currency, 0.0)
            self.credit.setdefault(currency, 0.0)
        self.co2e_grams = co2e_grams
        self.unpriced_joules = {"price": 0.0, "carbon": 0.0} | dict(unpriced_joules)

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
    """What one energy step cost, for per-workload attribution and tests."""

    facility_joules: float
    cost: tuple[tuple[str, float], ...]  # currency -> signed amount
    co2e_grams: float
    unpriced: tuple[tuple[str, float], ...]  # signal -> joules


class _SignalInForce:
    """One signal's chain state as taken at the start of a round, with the value last found in force.

    Every GPU of a round reads at nearly the same moments, so a step usually lies inside the interval
    the previous GPU's step found: that interval answers without another lookup."""

    def __init__(self, state: ChainState, now: float) -> None:
        self.state = state
        self.now = now
        self._last: Value | None = None

    def split(self, t0: float, t1: float) -> list[tuple[float, Value | None]]:
        last = self._last
        # Only the preferred source's interval can answer alone: a fallback's may be overtaken mid-step.
        if last is not None and last.interval.start <= t0 and t1 <= last.interval.end and t1 > t0:
            return [(1.0, last)]
        pieces = self.state.split(t0, t1, self.now)
        if len(pieces) == 1 and pieces[0][1] is not None and pieces[0][1].source_index == 0:
            self._last = pieces[0][1]
        return pieces


class Tariff:
    """Price, carbon intensity and PUE as they stand for one sampling round: taken once per round, so
    every GPU of the round is priced from the same data, whatever a source fetch changes meanwhile."""

    def __init__(self, grid: GridSignals, now: float) -> None:
        self.pue = grid.pue
        self.price = _SignalInForce(grid.price.state, now) if grid.price is not None else None
        self.carbon = _SignalInForce(grid.carbon.state, now) if grid.carbon is not None else None


def charge(step: EnergyStep, tariff: Tariff) -> StepCharge:
    """Price and weigh one step. Pure: reads the chains' immutable states taken for the round."""
    joules = step.joules * tariff.pue
    cost: dict[str, float] = {}
    grams = 0.0
    unpriced: dict[str, float] = {}
    if joules == 0.0:
        return StepCharge(0.0, (), 0.0, ())
    if tariff.price is not None:
        for fraction, value in tariff.price.split(step.start, step.end):
            part = joules * fraction
            if value is None or value.currency is None:
                unpriced["price"] = unpriced.get("price", 0.0) + part
            else:
                cost[value.currency] = cost.get(value.currency, 0.0) + part / JOULES_PER_KWH * value.value
    if tariff.carbon is not None:
        for fraction, value in tariff.carbon.split(step.start, step.end):
            part = joules * fraction
            if value is None:
                unpriced["carbon"] = unpriced.get("carbon", 0.0) + part
            else:
                grams += part / JOULES_PER_KWH * value.value
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


class PeriodTotalsSink(Protocol):
    """Where period totals are kept (periods.HostPeriods): splits steps at period boundaries, adds pieces."""

    def pieces(self, step: EnergyStep) -> Sequence[EnergyStep]: ...

    def add(self, piece: EnergyStep, charge: StepCharge) -> None: ...


def account_step(account: GpuAccount, step: EnergyStep, tariff: Tariff,
                 periods: PeriodTotalsSink | None = None) -> list[tuple[EnergyStep, StepCharge]]:
    """Price a step, add it to the GPU's totals and to the period totals; returns the pieces as charged.

    A step that spans a period boundary (midnight, the first of the month) is priced as one piece per
    period, so each period gets exactly its share and the counters exactly the sum of the pieces. Nearly
    every step lies within one period: it is then priced whole, as before."""
    pieces = (step,) if periods is None else periods.pieces(step)
    charged = []
    for piece in pieces:
        c = charge(piece, tariff)
        apply(account, c)
        if periods is not None:
            periods.add(piece, c)
        charged.append((piece, c))
    return charged
