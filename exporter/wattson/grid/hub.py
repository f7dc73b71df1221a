"""The grid hub's answer: `GET /api/v1/grid`, what this wattson knows of each grid signal, for other wattsons.

On a fleet, every wattson polling the price and carbon APIs itself multiplies the requests against
rate-limited, metered APIs by the number of hosts, and spreads their keys over every GPU node. A hub is one
wattson (usually `gpu.backend: none`) that polls them for a set of zones; hosts read it with a `wattson`
source (`wattson.grid.wattson`) and keep a local fallback.

The body holds, per signal and zone, the timeline the hub's chain prices with, from 24 hours ago through
the end of its data (at most 7 days ahead): pieces cut with the chain's own fallback logic
(`ChainState.timeline`, the boundaries `split` uses), each with the upstream source serving it, so a host
prices every moment with exactly what the hub would, and says where the value came from:

    {"version": 1, "generated_at": 1736942400.5,
     "signals": [{"signal": "carbon", "zone": "DE", "intervals": [
         {"start": 1736856000.0, "end": 1736859600.0, "value": 123.0, "unit": "gCO2e/kWh", "currency": null,
          "source": "electricitymaps", "estimated": false, "forecast": false, "fetched_at": 1736942390.1}]}]}

Times are UNIX seconds. Prices are as the hub exports them (its `adder_per_kwh` and `multiplier` applied).
Time no source of the chain covers is left out, never sent as 0. The timeline's ends are whole hours,
so the body changes only when the data do (a fetch, a source going stale) or an hour turns: its ETag is a
hash of everything but `generated_at`, and a host's `If-None-Match` with it is answered 304 without a body.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .forecast import SEARCH_LIMIT_SECONDS

if TYPE_CHECKING:  # only for type hints: signal.py is imported by whoever builds the grid
    from .signal import GridSignals, SignalChain

VERSION = 1
PATH = "/api/v1/grid"
CONTENT_TYPE = "application/json"
CARBON_UNIT = "gCO2e/kWh"
HISTORY_SECONDS = 86400.0  # a host restarted within a day can still price what it missed
HORIZON_SECONDS = SEARCH_LIMIT_SECONDS  # as far ahead as best windows are searched
ALIGN_SECONDS = 3600.0  # the timeline's ends move by whole hours, so the ETag holds between fetches
SIGNALS = ("carbon", "price")
_NO_CACHE = {"Cache-Control": "no-cache"}


def _last(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def unit(signal: str, currency: str | None) -> str:
    """The unit of a value as the body states it: gCO2e/kWh, or <currency>/kWh."""
    return CARBON_UNIT if signal == "carbon" else f"{currency}/kWh"


def signal_intervals(chain: SignalChain, now: float) -> list[dict[str, Any]]:
    """The chain's timeline at `now` as the body lists it."""
    state = chain.state
    lo = math.floor((now - HISTORY_SECONDS) / ALIGN_SECONDS) * ALIGN_SECONDS
    fresh = [c for c in state.caches if c is not None and now - c.fetched_at <= state.max_age]
    if not fresh:
        return []
    data_end = max(iv.end for c in fresh for iv in c.intervals)
    hi = min(data_end, math.ceil((now + HORIZON_SECONDS) / ALIGN_SECONDS) * ALIGN_SECONDS)
    out = []
    for start, end, v in state.timeline(lo, hi, now):
        out.append({"start": float(start), "end": float(end), "value": float(v.value),
                    "unit": unit(state.signal, v.currency),
                    "currency": v.currency, "source": v.origin, "estimated": v.interval.estimated,
                    "forecast": v.interval.forecast, "fetched_at": float(v.fetched_at)})
    return out


def served(grid: GridSignals) -> list[dict[str, str]]:
    """Each signal and zone this wattson serves (a disabled signal is not served)."""
    return [{"signal": c.signal, "zone": c.zone} for c in grid.chains]


def etag_of(content: Any) -> str:
    """A strong ETag: the SHA-256 of the content as canonical JSON."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or is `*`). Weak comparison, as RFC 9110 asks for
    If-None-Match: a W/ prefix does not matter."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or (tag[2:] if tag.startswith("W/") else tag) == etag:
            return True
    return False


def _not_served(grid: GridSignals, message: str) -> tuple[int, dict[str, str], bytes]:
    body = {"error": message, "served": served(grid)}
    return 404, dict(_NO_CACHE), json.dumps(body).encode()


def grid_response(grid: GridSignals, now: float, query: Mapping[str, Sequence[str]],
                  if_none_match: str | None) -> tuple[int, dict[str, str], bytes]:
    """`GET /api/v1/grid` as (HTTP status, extra headers, JSON body bytes; CONTENT_TYPE).

    `query` is the parsed query string (urllib.parse.parse_qs): `signal=carbon|price` and `zone=<zone>`
    (any letter case) narrow the answer to one chain. 200 with the body and an ETag; 304 with the ETag and
    no body when `if_none_match` names it; 404 with `{"error": one line, "served": [{"signal", "zone"}]}`
    when the signal or zone asked for is not one this wattson serves."""
    want_signal, want_zone = _last(query, "signal"), _last(query, "zone")
    chains = list(grid.chains)
    if want_signal is not None:
        if want_signal not in SIGNALS:
            return _not_served(grid, f"unknown signal {want_signal[:40]!r}: expected carbon or price")
        chains = [c for c in chains if c.signal == want_signal]
        if not chains:
            return _not_served(grid, f"the {want_signal} signal is not served here (disabled)")
    if want_zone is not None:
        chains = [c for c in chains if c.zone.upper() == want_zone.strip().upper()]
        if not chains:
            what = f"the {want_signal} signal" if want_signal is not None else "any signal"
            return _not_served(grid, f"zone {want_zone[:40]!r} is not served here for {what}")
    content = {"version": VERSION,
               "signals": [{"signal": c.signal, "zone": c.zone, "intervals": signal_intervals(c, now)}
                           for c in chains]}
    etag = etag_of(content)
    headers = {"ETag": etag, **_NO_CACHE}
    if matches(if_none_match, etag):
        return 304, headers, b""
    body = {"version": VERSION, "generated_at": now, "signals": content["signals"]}
    return 200, headers, json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
