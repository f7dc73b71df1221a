"""The one place where grid source types are registered: type name -> (config model, factory).

Adding a provider is one new module with a `Config` model (with a `type` literal) and a
`build(cfg, zone)` factory, plus one line here. `build_grid` turns the `grid:` section of the
config into signal chains (not yet started): each source with the transform its own config asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..logfmt import kv
from ..model import PriceAdjustments
from . import (
    awattar,
    bundled,
    electricitymaps,
    entsoe,
    octopus,
    static,
    tou,
    ukcarbonintensity,
    wattson,
    watttime,
)
from .base import GridSource, Signal
from .signal import GridSignals, SignalChain

if TYPE_CHECKING:
    from ..config import CarbonSignalConfig, Config, PriceSignalConfig

log = logging.getLogger("wattson.grid")

Factory = Callable[[Any, str], GridSource]

CARBON_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticCarbonConfig, static.build_carbon),
    "bundled": (bundled.Config, bundled.build),
    "electricitymaps": (electricitymaps.Config, electricitymaps.build),
    "watttime": (watttime.Config, watttime.build),
    "ukcarbonintensity": (ukcarbonintensity.Config, ukcarbonintensity.build),
    "wattson": (wattson.CarbonConfig, wattson.build_carbon),  # a grid hub: another wattson
}

PRICE_SOURCES: dict[str, tuple[type, Factory]] = {
    "static": (static.StaticPriceConfig, static.build_price),
    "tou": (tou.Config, tou.build),
    "entsoe": (entsoe.Config, entsoe.build),
    "octopus": (octopus.Config, octopus.build),
    "awattar": (awattar.Config, awattar.build),
    "wattson": (wattson.PriceConfig, wattson.build_price),  # a grid hub: another wattson
}


def build_source(signal: str, cfg: Any, zone: str) -> GridSource:
    table = CARBON_SOURCES if signal == "carbon" else PRICE_SOURCES
    _model, factory = table[cfg.type]
    return factory(cfg, zone)


def _unchanged(value: float) -> float:
    return value


def value_transform(cfg: Any) -> Callable[[float], float]:
    """What a source's own config does to its values before export. Price sources carry retail
    adjustments: exported price = (price + adder_per_kwh) * multiplier. Carbon values pass unchanged."""
    if isinstance(cfg, PriceAdjustments):
        return cfg.adjust
    return _unchanged


def build_grid(cfg: Config, previous: GridSignals | None = None) -> GridSignals:
    """The configured chains, not started; a source that rejects its settings is a config error naming
    its key. With `previous` (the running grid, on reload), every source whose signal, zone, type and
    config are unchanged carries over its cache, error counters, health and schedule; the others start
    fresh. The caller stops the previous grid and starts this one; nothing is shared between the two."""
    from ..config import ConfigError  # imported here: config imports this module for the source tables

    wanted: tuple[tuple[Signal, CarbonSignalConfig | PriceSignalConfig | None], ...] = (
        ("carbon", cfg.grid.carbon), ("price", cfg.grid.price))
    chains: dict[Signal, SignalChain] = {}
    for signal, sig in wanted:
        if sig is None:
            continue  # disabled: no chain
        sources: list[GridSource] = []
        src_cfg: Any  # one of the models in the tables above; config.py builds their union at run time
        for i, src_cfg in enumerate(sig.sources):
            try:
                sources.append(build_source(signal, src_cfg, sig.zone))
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"grid.{signal}.sources[{i}] ({src_cfg.type}): {exc}") from None
        transforms = [value_transform(src_cfg) for src_cfg in sig.sources]
        chain = SignalChain(signal, sig.zone, sig.max_age_seconds, sources, transforms, configs=sig.sources)
        old = previous.chain(signal) if previous is not None else None
        if old is not None:
            kept = chain.adopt_from(old)
            log.debug("grid sources carried over", extra=kv(
                signal=signal, kept=",".join(sources[i].name for i in kept) or "none",
                fresh=len(sources) - len(kept)))
        chains[signal] = chain
    return GridSignals(pue=cfg.grid.pue, carbon=chains.get("carbon"), price=chains.get("price"),
                       forecast_windows=cfg.grid.forecast.window_seconds())
