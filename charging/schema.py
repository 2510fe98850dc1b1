"""The wire format: the only place where a charge request or an outcome is parsed.

Producers (any language) XADD request entries; workers and the producer library both
validate them here, so a request the producer accepts is one the worker accepts.
Every way a request can be wrong maps to one stable reason code (see README).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator
from pydantic_core import PydanticCustomError

from charging.keys import Keys, partition_of
from charging.settings import Settings

MAX_FIELDS = 16
MAX_FIELD_BYTES = 256
MAX_SUBMITTED_AT = 10**14  # ms since epoch; year 5138, anything larger is garbage

ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_DIGITS = re.compile(r"[0-9]{1,20}")

# Reason code for a field whose value is wrong (as opposed to missing or unknown).
_FIELD_REASON = {
    "request_id": "invalid_request_id",
    "account": "invalid_account",
    "service": "unknown_service",
    "units": "invalid_units",
    "amount": "invalid_amount",
    "reply_to": "invalid_reply_to",
    "submitted_at": "invalid_submitted_at",
}


class Invalid(ValueError):
    """A request that can never be charged. ``reason`` is the stable code that goes
    into the dead-letter entry's ``error`` field; ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _whole_number(value: Any) -> int:
    """Only plain digits (or a JSON integer): no sign, float, exponent, NaN or spaces."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise PydanticCustomError("not_whole", "must be a whole number written in digits, got {value!r}", {"value": value})


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class ChargeRequest(BaseModel):
    """One charge: ``service`` and ``units`` (rated by the tariff), or an explicit ``amount``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(pattern=r"^[\x21-\x7e]{1,128}$")
    account: str = Field(pattern=ACCOUNT_PATTERN)
    service: Literal["sms", "voice", "data"] | None = None
    units: WholeNumber | None = None
    amount: WholeNumber | None = None
    reply_to: str | None = None
    submitted_at: WholeNumber | None = None

    @field_validator("units")
    @classmethod
    def _units_in_range(cls, units: int | None, info: ValidationInfo) -> int | None:
        return _in_range(units, 1, _limits(info).max_units)

    @field_validator("amount")
    @classmethod
    def _amount_in_range(cls, amount: int | None, info: ValidationInfo) -> int | None:
        return _in_range(amount, 1, _limits(info).max_amount)

    @field_validator("submitted_at")
    @classmethod
    def _sane_time(cls, submitted_at: int | None) -> int | None:
        return _in_range(submitted_at, 0, MAX_SUBMITTED_AT)

    @model_validator(mode="after")
    def _one_kind_of_charge(self, info: ValidationInfo) -> ChargeRequest:
        if self.amount is not None and (self.service is not None or self.units is not None):
            raise PydanticCustomError("ambiguous_charge", "give either amount or service with units, not both")
        if self.amount is None and (self.service is None or self.units is None):
            missing = "units" if self.service is not None else "service"
            raise PydanticCustomError("missing_field", "field {name!r} is required (or give amount)", {"name": missing})
        settings = _limits(info)
        if self.reply_to is not None:
            keys = Keys(settings.namespace, partition_of(self.account, settings.partitions))
            if not keys.owns_reply_stream(self.reply_to):
                raise PydanticCustomError(
                    "invalid_reply_to", "reply_to must be a key {prefix}<id> in the account's partition",
                    {"prefix": keys.reply("")},
                )
        return self

    @property
    def fingerprint(self) -> str:
        """What a replay of this request id must match to count as the same request."""
        if self.amount is not None:
            return f"{self.account}|amount|{self.amount}"
        return f"{self.account}|{self.service}|{self.units}"

    def to_fields(self) -> dict[str, str]:
        """The entry as XADDed to the request stream."""
        return {k: str(v) for k, v in self.model_dump(exclude_none=True).items()}


class TopUp(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str = Field(pattern=ACCOUNT_PATTERN)
    amount: WholeNumber

    @field_validator("amount")
    @classmethod
    def _amount_in_range(cls, amount: int, info: ValidationInfo) -> int:
        return _in_range(amount, 1, _limits(info).max_amount)


def parse_top_up(account: str, amount: str, settings: Settings) -> tuple[str, int]:
    try:
        top_up = TopUp.model_validate({"account": account, "amount": amount}, context={"settings": settings})
    except ValidationError as exc:
        raise _invalid(exc) from None
    return top_up.account, top_up.amount


def _limits(info: ValidationInfo) -> Settings:
    return info.context["settings"]


def _in_range(value: int | None, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise PydanticCustomError("out_of_range", "must be between {low} and {high}, got {value}",
                                  {"low": low, "high": high, "value": value})
    return value


def parse_request(fields: Mapping[Any, Any], settings: Settings) -> ChargeRequest:
    """Validate a request from a stream entry (bytes) or from JSON / keyword arguments.

    Raises Invalid with a reason code; never anything else for bad input.
    """
    if not fields:
        raise Invalid("entry_deleted", "the entry has no fields (deleted or trimmed before it was read)")
    if len(fields) > MAX_FIELDS:
        raise Invalid("too_many_fields", f"{len(fields)} fields, at most {MAX_FIELDS}")
    data = {}
    for key, value in fields.items():
        name = _text(key, "field name")
        data[name] = _text(value, name)
    try:
        return ChargeRequest.model_validate(data, context={"settings": settings})
    except ValidationError as exc:
        raise _invalid(exc) from None


def _text(value: Any, what: str) -> Any:
    """Decode bytes strictly and refuse anything over the field size limit."""
    if isinstance(value, bytes):
        if len(value) > MAX_FIELD_BYTES:
            raise Invalid("field_too_long", f"{what} is {len(value)} bytes, at most {MAX_FIELD_BYTES}")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("invalid_encoding", f"{what} is not valid UTF-8") from None
    if isinstance(value, str) and len(value.encode()) > MAX_FIELD_BYTES:
        raise Invalid("field_too_long", f"{what} is {len(value.encode())} bytes, at most {MAX_FIELD_BYTES}")
    return value


def _invalid(exc: ValidationError) -> Invalid:
    error = exc.errors(include_url=False)[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "missing":
        return Invalid("missing_field", f"field {name!r} is required")
    if error["type"] == "extra_forbidden":
        return Invalid("unknown_field", f"field {name!r} is not part of the request format")
    if error["type"] in ("ambiguous_charge", "missing_field", "invalid_reply_to"):
        return Invalid(error["type"], error["msg"])
    return Invalid(_FIELD_REASON.get(name, "invalid_field"), f"{name}: {error['msg']}")


@dataclass(frozen=True)
class Outcome:
    """The settled result of one request, as posted to the results and reply streams."""

    request_id: str
    account: str
    status: str
    reason: str
    charged: int
    balance: int
    duplicate: bool
    submitted_at: int | None
    processed_at: int

    @property
    def approved(self) -> bool:
        return self.status == "approved"

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Outcome:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            request_id=f["request_id"], account=f["account"], status=f["status"], reason=f["reason"],
            charged=int(f["charged"]), balance=int(f["balance"]), duplicate=f["duplicate"] == "1",
            submitted_at=int(f["submitted_at"]) if f["submitted_at"] else None,
            processed_at=int(f["processed_at"]),
        )

    @classmethod
    def from_reply(cls, request: ChargeRequest, reply: list) -> Outcome:
        status, reason, charged, balance, duplicate, processed_at = reply
        return cls(
            request_id=request.request_id, account=request.account, status=_str(status), reason=_str(reason),
            charged=int(charged), balance=int(balance), duplicate=bool(int(duplicate)),
            submitted_at=request.submitted_at, processed_at=int(processed_at),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "account": self.account, "status": self.status,
            "reason": self.reason, "charged": self.charged, "balance": self.balance,
            "duplicate": self.duplicate, "submitted_at": self.submitted_at, "processed_at": self.processed_at,
        }


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
