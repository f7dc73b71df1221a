"""Constant signals from the config: a flat tariff or a fixed carbon intensity."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..model import PriceAdjustments, SourceConfigBase
from .base import FetchResult, Interval, Signal
from .limits import MAX_GRAMS_PER_KWH

# A constant is valid forever; one far-future bound keeps interval arithmetic finite.
FOREVER = 4102444800.0  # 2100-01-01T00:00:00Z


class StaticCarbonConfig(SourceConfigBase):
    type: Literal["static"]
    grams_per_kwh: float = Field(ge=0, le=MAX_GRAMS_PER_KWH,
                                 description="Constant grid carbon intensity in gCO2e/kWh.")


class StaticPriceConfig(SourceConfigBase, PriceAdjustments):
    type: Literal["static"]
    price_per_kwh: float = Field(description="Flat tariff in currency units per kWh (may be negative).")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR.")

    @model_validator(mode="after")
    def _plausible(self) -> StaticPriceConfig:
        self.check_price(("price_per_kwh",), self.price_per_kwh, self.currency)
        return self


class StaticSource:
    poll_interval_seconds = 3600.0

    def __init__(self, signal: Signal, zone: str, value: float, currency: str | None) -> None:
        self.name = "static"
        self.signal = signal
        self.zone = zone
        self._result = FetchResult(intervals=(Interval(0.0, FOREVER, value),), currency=currency)

    def fetch(self, now: float) -> FetchResult:
        return self._result

    def secrets(self) -> tuple[str, ...]:
        return ()


def build_carbon(cfg: StaticCarbonConfig, zone: str) -> StaticSource:
    return StaticSource("carbon", zone, cfg.grams_per_kwh, None)


def build_price(cfg: StaticPriceConfig, zone: str) -> StaticSource:
    return StaticSource("price", zone, cfg.price_per_kwh, cfg.currency)
