"""What counts as an absurd signal value: beyond these a value is a unit mistake or a broken feed, not data.

One place for the bounds, so the config check at start, the responses' validators and the chain's check
of every fetch agree (a static price that starts fine must never be rejected later at run time).
"""

from __future__ import annotations

# No grid on Earth is dirtier than pure lignite (~1,100 g/kWh); beyond this is "absurd".
MAX_GRAMS_PER_KWH = 5000.0

# |price| per kWh beyond which a price is absurd in a currency worth about a euro or more (EUR, USD, GBP,
# CHF, ...): even the worst scarcity spikes of day-ahead markets stay far below 100 per kWh.
DEFAULT_MAX_ABS_PRICE_PER_KWH = 100.0

# Currencies whose unit is small: the same absurd level, about 100 EUR per kWh, converted at rough
# mid-2025 exchange rates (units per EUR in the comment) and rounded up to the next 1-2-5 step. They only
# need to be right within a factor of a few; a currency losing value fast (ARS, TRY) may need the
# per-source `max_abs_price_per_kwh` override some day.
SMALL_UNIT_MAX_ABS_PRICE_PER_KWH: dict[str, float] = {
    "DKK": 1_000.0,  # ~7.5
    "CNY": 1_000.0,  # ~8
    "HKD": 1_000.0,  # ~9
    "SEK": 2_000.0,  # ~11
    "NOK": 2_000.0,  # ~12
    "ZAR": 5_000.0,  # ~20
    "MXN": 5_000.0,  # ~21
    "CZK": 5_000.0,  # ~25
    "TWD": 5_000.0,  # ~35
    "THB": 5_000.0,  # ~38
    "UAH": 5_000.0,  # ~47
    "TRY": 10_000.0,  # ~45, falling
    "EGP": 10_000.0,  # ~57
    "PHP": 10_000.0,  # ~65
    "RUB": 10_000.0,  # ~93
    "INR": 10_000.0,  # ~96
    "RSD": 20_000.0,  # ~117
    "ISK": 20_000.0,  # ~145
    "JPY": 20_000.0,  # ~165
    "PKR": 50_000.0,  # ~325
    "HUF": 50_000.0,  # ~395
    "KZT": 100_000.0,  # ~590
    "CLP": 200_000.0,  # ~1,090
    "ARS": 200_000.0,  # ~1,300, falling
    "KRW": 200_000.0,  # ~1,600
    "NGN": 200_000.0,  # ~1,750
    "COP": 500_000.0,  # ~4,700
    "IDR": 2_000_000.0,  # ~18,800
    "VND": 5_000_000.0,  # ~30,000
}


def max_abs_price_per_kwh(currency: str | None, override: float | None = None) -> float:
    """The largest plausible |price| per kWh in `currency`; `override` (a source's max_abs_price_per_kwh)
    wins when set."""
    if override is not None:
        return override
    return SMALL_UNIT_MAX_ABS_PRICE_PER_KWH.get((currency or "").upper(), DEFAULT_MAX_ABS_PRICE_PER_KWH)
