"""The one place where grid source types are registered: type name -> (config model, factory).

Adding a provider is one new module with a `Config` model (with a `type` literal) and a
`build(cfg, zone)` factory, plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import static
from .base import GridSource

Factory = Callable[[Any, str], GridSource]

CARBON_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticCarbonConfig, static.build_carbon),
    # carbon sources: add one line each below
}

PRICE_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticPriceConfig, static.build_price),
    # price sources: add one line each below
}


def build_source(signal: str, cfg: Any, zone: str) -> GridSource:
    table = CARBON_SOURCES if signal == "carbon" else PRICE_SOURCES
    _model, factory = table[cfg.type]
    return factory(cfg, zone)
