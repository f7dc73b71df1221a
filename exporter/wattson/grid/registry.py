"""The one place where grid source types are registered: type name -> (config model, factory).

Adding a provider is one new module with a `Config` model (with a `type` literal) and a
`build(cfg, zone)` factory, plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import (
    awattar,
    bundled,
    electricitymaps,
    entsoe,
    octopus,
    static,
    tou,
    ukcarbonintensity,
    watttime,
)
from .base import GridSource

Factory = Callable[[Any, str], GridSource]

CARBON_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticCarbonConfig, static.build_carbon),
    "bundled": (bundled.Config, bundled.build),
    "electricitymaps": (electricitymaps.Config, electricitymaps.build),
    "watttime": (watttime.Config, watttime.build),
    "ukcarbonintensity": (ukcarbonintensity.Config, ukcarbonintensity.build),
}

PRICE_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticPriceConfig, static.build_price),
    "tou": (tou.Config, tou.build),
    "entsoe": (entsoe.Config, entsoe.build),
    "octopus": (octopus.Config, octopus.build),
    "awattar": (awattar.Config, awattar.build),
}


def build_source(signal: str, cfg: Any, zone: str) -> GridSource:
    table = CARBON_SOURCES if signal == "carbon" else PRICE_SOURCES
    _model, factory = table[cfg.type]
    return factory(cfg, zone)
