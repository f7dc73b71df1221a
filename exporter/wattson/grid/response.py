"""API responses described as pydantic models, and the one translation of what they reject into SourceError.

Each source declares what its provider answers (`ApiModel` subclasses: strict types, so a string where
a number belongs is refused; extra fields ignored, because APIs add fields) and calls `parse`. When a
response does not match, the first problem becomes a SourceError whose reason is bounded (ERROR_REASONS)
and whose message names the source, the API call, the path inside the response and what is wrong:

    electricitymaps: GET /v3/carbon-intensity/history: history[0].datetime: field 'datetime' is missing

A validator says which reason it means by raising `fault(reason, message)`; a missing key is
'missing_field'; any other mismatch of shape or type is 'malformed'.

JSON numbers arrive as Decimal (`http.decode_json`): prices stay exact, and float fields take them as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainValidator, ValidationError, ValidationInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from .base import ERROR_REASONS, SourceError
from .limits import DEFAULT_MAX_ABS_PRICE_PER_KWH, MAX_GRAMS_PER_KWH

# The providers validated here price in EUR or GBP: more per kWh is a unit mistake, not a market price.
MAX_ABS_PRICE_PER_KWH = Decimal(int(DEFAULT_MAX_ABS_PRICE_PER_KWH))


class ApiModel(BaseModel):
    """A provider's answer, or a part of it: types are strict, unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, where: str, context: Mapping[str, Any] | None = None) -> M:
    """`data` as `model`, or the SourceError that says where and why it is not. `where` names the source and
    the API call ("octopus: GET /v1/..."); `context` holds what the request asked for (zone, region, ...),
    for validators that check the answer is about that."""
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        raise source_error(exc, where) from None


def fault(reason: str, message: str) -> PydanticCustomError:
    """The error a validator raises for a value the API must not send. `reason` is one of ERROR_REASONS;
    `message` continues "field 'name' ..." (or stands alone in a model validator)."""
    assert reason in ERROR_REASONS, reason
    return PydanticCustomError(reason, message)


def show(value: Any) -> str:
    """A value from a response as a message shows it: short, and never a whole object."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)[:40]


# What a field of each pydantic type error should have been.
_EXPECTED = {
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "list_type": "an array",
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "decimal_type": "a number",
    "decimal_parsing": "a number",
    "is_instance_of": "a number",  # the only instance check here: JSON numbers decoded as Decimal
}


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _problem(err: ErrorDetails, field: str | None) -> str:
    kind, value = err["type"], err["input"]
    if kind in ERROR_REASONS:
        return err["msg"]
    if kind == "missing":
        return "is missing"
    if kind in _EXPECTED:
        return f"is not {_EXPECTED[kind]} (got {show(value)})" if field else \
            f"expected {_EXPECTED[kind]}, got {show(value)}"
    if kind == "literal_error":
        return f"is {show(value)}, expected {err.get('ctx', {}).get('expected', '?')}"
    msg = err["msg"]
    return f"is {show(value)}: {msg[:1].lower()}{msg[1:]}"


def source_error(exc: ValidationError, where: str) -> SourceError:
    """The first problem pydantic found (fields are checked in the order the model declares them) as a
    one-line SourceError: '<where>: <path>: field '<name>' <problem>'."""
    err = exc.errors(include_url=False)[0]
    kind, loc = err["type"], tuple(err["loc"])
    reason = kind if kind in ERROR_REASONS else "missing_field" if kind == "missing" else "malformed"
    field = loc[-1] if loc and isinstance(loc[-1], str) else None
    problem = _problem(err, field)
    subject = f"field '{field}' {problem}" if field is not None else problem
    # A top-level field names itself; anything deeper is located by its full path.
    at = _path(loc) if len(loc) > 1 or (loc and field is None) else ""
    return SourceError(reason, f"{where}: {at}: {subject}" if at else f"{where}: {subject}")


def asked(info: ValidationInfo, key: str) -> Any:
    """What the request asked for (zone, region, ...), as `parse` passed it in its context."""
    return (info.context or {})[key]


# --- field types shared by the sources ------------------------------------------------------------------

def _iso_time(value: Any) -> float:
    """ISO 8601 timestamp (with Z or offset) -> UNIX seconds. Naive timestamps are taken as UTC."""
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    raise fault("malformed", f"is not an ISO 8601 time: {show(value)}")


IsoTime = Annotated[float, PlainValidator(_iso_time)]


def _intensity(value: float) -> float:
    if not 0 <= value <= MAX_GRAMS_PER_KWH:
        raise fault("invalid_value", f"= {show(value)} gCO2e/kWh is outside 0..{MAX_GRAMS_PER_KWH:g}")
    return value


# Grid carbon intensity in gCO2e/kWh; no real grid is outside 0..MAX_GRAMS_PER_KWH.
Intensity = Annotated[float, AfterValidator(_intensity)]


def _same_zone(value: str, info: ValidationInfo) -> str:
    want = asked(info, "zone")
    if value.upper() != want.upper():
        raise fault("wrong_zone", f"is {show(value)}, expected {show(want)}")
    return value


# The zone (or region) an answer says it is for: the one asked for (context "zone"), in any letter case.
SameZone = Annotated[str, AfterValidator(_same_zone)]


def plausible_price(unit: str, per_kwh: int) -> Callable[[Decimal], Decimal]:
    """A validator for an exact price in `unit` (`per_kwh` of them make one currency unit per kWh):
    a price beyond MAX_ABS_PRICE_PER_KWH per kWh, either sign, is a unit mistake, not a market price."""
    def check(value: Decimal) -> Decimal:
        if not value.is_finite() or abs(value) / per_kwh > MAX_ABS_PRICE_PER_KWH:
            raise fault("invalid_value", f"= {value} {unit} is not a plausible price "
                                         f"(|price| over {MAX_ABS_PRICE_PER_KWH} per kWh)")
        return value
    return check
