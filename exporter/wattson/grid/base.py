"""The small interfaces every grid source implements, and the data they return.

A source turns one provider's API into `Interval`s in normalised units:
carbon intensity in gCO2e/kWh, price in currency units per kWh (before retail
adjustments, which the signal layer applies). Sources never decide fallback,
caching or pacing; `wattson.grid.signal` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Signal = Literal["carbon", "price"]

# Bounded set of reasons, used as the `reason` label of wattson_source_errors_total.
ERROR_REASONS = (
    "timeout",
    "connection",
    "http_4xx",
    "http_5xx",
    "rate_limited",
    "auth",
    "malformed",
    "missing_field",
    "wrong_zone",
    "invalid_value",
    "no_data",
    "stale",
)

# 1 lb/MWh expressed in g/kWh: 453.59237 g / 1000 kWh. Exact by definition of the pound.
LBS_PER_MWH_TO_G_PER_KWH = 0.45359237


@dataclass(frozen=True, order=True)
class Interval:
    """A value valid over [start, end) in UNIX seconds (UTC)."""

    start: float
    end: float
    value: float
    estimated: bool = False
    forecast: bool = False
    # The upstream source this value came from when the source relays another wattson's data (a grid hub:
    # "electricitymaps" behind "wattson"); "" when the source is the origin itself.
    origin: str = ""

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class FetchResult:
    """What one successful fetch returns."""

    intervals: tuple[Interval, ...]
    currency: str | None = None  # ISO 4217 code for price sources; None for carbon
    # Seconds until the source wants to be polled again (None = use the configured poll interval).
    next_poll_seconds: float | None = None
    notes: dict[str, str] = field(default_factory=dict)


class SourceError(Exception):
    """A fetch failed. `reason` is one of ERROR_REASONS; the message names the source, API and field.

    Messages must never contain secrets: build them from field names, not from URLs with tokens.
    """

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason in ERROR_REASONS else "malformed"
        self.retry_after = retry_after


class MissingSecret(SourceError):
    """The source's API key (or password) is not set: its environment variable is unset or empty, or its
    file is empty or unreadable. Down with reason 'auth' until one is provided; the chain says so once rather
    than at every retry. The message names the variable or file, never a value."""

    def __init__(self, message: str) -> None:
        super().__init__("auth", message)


class GridSource(Protocol):
    """One configured provider for one signal and one zone."""

    name: str  # the source type ("electricitymaps", "entsoe", ...) -> the `source` label
    signal: Signal
    zone: str
    poll_interval_seconds: float  # default pacing when FetchResult does not say otherwise

    def fetch(self, now: float) -> FetchResult:
        """Fetch intervals around `now` (some past, the current one, any forecast). Raises SourceError."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """Secret strings this source holds, so logs and errors can redact them."""
        ...
