"""Base models for configuration: strict (unknown keys are errors) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    """Retail adjustments: exported price = (wholesale + adder_per_kwh) * multiplier."""

    adder_per_kwh: float = Field(default=0.0, description="Network fees, levies, supplier margin per kWh.")
    multiplier: float = Field(default=1.0, gt=0, description="VAT and similar, e.g. 1.19.")
