"""Base models for configuration: strict (unknown keys are errors), immutable, and finite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from .grid.limits import max_abs_price_per_kwh


class StrictModel(BaseModel):
    # allow_inf_nan=False: `.nan` or `.inf` in any float of the file is refused at start, once for every
    # model, instead of reaching a price or a threshold and poisoning every counter it touches.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def field_error(loc: Sequence[str | int], message: str, value: Any) -> ValidationError:
    """An error a model validator raises about one of its keys (or a key below it), so the one-line config
    error names that key and its line rather than the model's. pydantic prefixes `loc` with the model's own."""
    detail = InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}),
                              loc=tuple(loc), input=value)
    return ValidationError.from_exception_data("config", [detail])


class SourceConfigBase(StrictModel):
    """Keys every grid source accepts."""

    zone: str | None = Field(
        default=None, description="Zone code as this provider spells it; defaults to the signal's zone.")
    poll_interval_seconds: float | None = Field(
        default=None, ge=1, description="Override the source's default polling interval.")


class HttpSourceConfigBase(SourceConfigBase):
    """Keys every web API source accepts. API keys come from env or file, never inline."""

    base_url: str = Field(description="API root; point it at a proxy, mirror or test server.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="HTTP timeout per request.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    api_key_file: str | None = Field(default=None, description="File holding the API key.")


class PriceAdjustments(StrictModel):
    """Keys every price source accepts: retail adjustments, exported price = (wholesale + adder_per_kwh) *
    multiplier, and the bound beyond which an exported price is refused as absurd."""

    adder_per_kwh: float = Field(default=0.0, description="Network fees, levies, supplier margin per kWh.")
    multiplier: float = Field(default=1.0, gt=0, description="VAT and similar, e.g. 1.19.")
    max_abs_price_per_kwh: float | None = Field(
        default=None, gt=0, description="Refuse exported prices (after adder and multiplier) beyond this, "
        "either sign; default by currency: 100, more for currencies with a small unit (see text).")

    def adjust(self, price: float) -> float:
        """The exported price for a wholesale or tariff price."""
        return (price + self.adder_per_kwh) * self.multiplier

    def check_price(self, loc: Sequence[str | int], price: float, currency: str) -> None:
        """Refuse at start a configured price whose exported value the chain would refuse at every poll."""
        limit = max_abs_price_per_kwh(currency, self.max_abs_price_per_kwh)
        exported = self.adjust(price)
        if abs(exported) > limit:
            raise field_error(loc, f"not a plausible price: exported as {exported:g} {currency}/kWh (after "
                                   f"adder_per_kwh and multiplier), beyond ±{limit:g}; set max_abs_price_per_kwh "
                                   "if it is right", price)
