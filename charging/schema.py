"""The wire format: the only place where a request (a charge or a reservation operation)
or an outcome is parsed.

Producers (any language) XADD request entries; workers and the producer library both
validate them here, so a request the producer accepts is one the worker accepts.
Every way a request can be wrong maps to one stable reason code (see docs/wire-format.md).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator
from pydantic_core import PydanticCustomError

from charging.errors import ChargingError
from charging.keys import keys_of
from charging.settings import Settings

MAX_FIELDS = 16
MAX_FIELD_BYTES = 256
MAX_SUBMITTED_AT = 10**14  # ms since epoch; year 5138, anything larger is garbage

ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# A reservation id is <account>/<request id of the reserve>: it names its partition, so a
# commit, extend or release needs nothing else to be routed, and a replayed reserve
# returns the same id. '/' cannot occur in an account, so the first one splits it.
RESERVATION_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}/[\x21-\x7e]{1,128}$"

Op = Literal["charge", "reserve", "commit", "extend", "release", "grant"]
ON_RESERVATION = ("commit", "extend", "release")  # act on an open reservation
# The fields each operation may carry besides op, request_id, account, reply_to, submitted_at.
_OP_FIELDS = {
    "charge": {"service", "units", "amount"},
    "reserve": {"service", "units", "amount", "ttl"},
    "commit": {"reservation", "units", "amount"},
    "extend": {"reservation", "units", "amount", "ttl"},
    "release": {"reservation"},
    "grant": {"service", "units", "amount", "lot", "expires_at", "expires_in"},
}
_OPTIONAL = ("service", "units", "amount", "reservation", "ttl", "lot", "expires_at", "expires_in")
LOT_PATTERN = r"[A-Za-z0-9_.-]{1,64}"  # a credit lot's id (docs/plans-and-lots.md), and never MAIN_LOT
MAIN_LOT = "main"  # the main balance, which no lot may be named
MAX_TIME_MS = 10**14  # the library's limit of a time in ms (year 5138)
MAX_DURATION_S = 315_360_000  # ten years, the library's longest duration
_DIGITS = re.compile(r"[0-9]{1,20}")

# Reason code for a field whose value is wrong (as opposed to missing or unknown).
_FIELD_REASON = {
    "op": "unknown_op",
    "request_id": "invalid_request_id",
    "account": "invalid_account",
    "service": "unknown_service",
    "units": "invalid_units",
    "amount": "invalid_amount",
    "reply_to": "invalid_reply_to",
    "submitted_at": "invalid_submitted_at",
    "reservation": "invalid_reservation",
    "ttl": "invalid_ttl",
    "lot": "invalid_lot",
    "expires_at": "invalid_expiry",
    "expires_in": "invalid_expiry",
}
# Errors raised by the model's own validators, whose type is the reason code.
_MODEL_REASONS = ("ambiguous_charge", "missing_field", "invalid_reply_to", "invalid_reservation", "field_not_allowed",
                  "invalid_expiry")


class Invalid(ChargingError, ValueError):
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
    raise PydanticCustomError("not_whole", "must be a whole number written in digits, got '{value}'", {"value": value})


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class ChargeRequest(BaseModel):
    """One request. ``op`` says what it does (charge by default, so producers written before
    reservations keep working):

    - charge, reserve: ``service`` and ``units`` (rated by the tariff), or an explicit
      ``amount``; a reserve may give ``ttl`` (seconds).
    - commit, extend: ``reservation``, and ``units`` (rated at the reservation's unit price)
      or ``amount``; an extend may give ``ttl``.
    - release: ``reservation``.
    - grant: a credit lot (docs/plans-and-lots.md): ``lot``, and ``amount`` (money,
      optionally of one ``service``) or ``service`` and ``units``; ``expires_at`` (ms since
      the epoch) or ``expires_in`` (seconds), or neither.

    ``account`` is optional for the operations on a reservation: it is the reservation
    id's own, and must match it when given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Op = "charge"
    request_id: str = Field(pattern=r"^[\x21-\x7e]{1,128}$")
    account: str = Field(pattern=ACCOUNT_PATTERN)
    service: Literal["sms", "voice", "data"] | None = None
    units: WholeNumber | None = None
    amount: WholeNumber | None = None
    reservation: str | None = Field(None, pattern=RESERVATION_PATTERN)
    ttl: WholeNumber | None = None
    reply_to: str | None = None
    submitted_at: WholeNumber | None = None
    lot: str | None = Field(None, pattern=f"^{LOT_PATTERN}$")
    expires_at: WholeNumber | None = None
    expires_in: WholeNumber | None = None

    @model_validator(mode="before")
    @classmethod
    def _account_of_reservation(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("op") not in ON_RESERVATION:
            return data
        reservation = data.get("reservation")
        if reservation is None:
            raise PydanticCustomError("missing_field", "field 'reservation' is required for op '{op}'",
                                      {"op": data["op"]})
        if not isinstance(reservation, str) or not re.fullmatch(RESERVATION_PATTERN, reservation):
            raise PydanticCustomError("invalid_reservation", "reservation must be <account>/<request id of the "
                                      "reserve>, got '{value}'", {"value": reservation})
        account = account_of(data)
        if data.get("account", account) != account:
            raise PydanticCustomError("invalid_reservation", "reservation '{reservation}' is not of account "
                                      "'{account}'", {"reservation": reservation, "account": data["account"]})
        return {**data, "account": account}

    @field_validator("units")
    @classmethod
    def _units_in_range(cls, units: int | None, info: ValidationInfo) -> int | None:
        return _in_range(units, 1, _limits(info).max_units)

    @field_validator("amount")
    @classmethod
    def _amount_in_range(cls, amount: int | None, info: ValidationInfo) -> int | None:
        return _in_range(amount, 1, _limits(info).max_amount)

    @field_validator("ttl")
    @classmethod
    def _ttl_in_range(cls, ttl: int | None, info: ValidationInfo) -> int | None:
        return _in_range(ttl, 1, _limits(info).max_reservation_ttl_s)

    @field_validator("submitted_at")
    @classmethod
    def _sane_time(cls, submitted_at: int | None) -> int | None:
        return _in_range(submitted_at, 0, MAX_SUBMITTED_AT)

    @field_validator("lot")
    @classmethod
    def _not_main(cls, lot: str | None) -> str | None:
        if lot == MAIN_LOT:
            raise PydanticCustomError("not_main", "main is the main balance, not a lot")
        return lot

    @field_validator("expires_at")
    @classmethod
    def _expiry_in_range(cls, expires_at: int | None) -> int | None:
        return _in_range(expires_at, 1, MAX_TIME_MS)

    @field_validator("expires_in")
    @classmethod
    def _expires_in_range(cls, expires_in: int | None) -> int | None:
        return _in_range(expires_in, 1, MAX_DURATION_S)

    @model_validator(mode="after")
    def _fields_of_the_op(self, info: ValidationInfo) -> ChargeRequest:
        for name in _OPTIONAL:
            if getattr(self, name) is not None and name not in _OP_FIELDS[self.op]:
                raise PydanticCustomError("field_not_allowed", "field '{name}' is not used by op '{op}'",
                                          {"name": name, "op": self.op})
        if self.op in ("commit", "extend"):
            _one_of_units_or_amount(self)
        elif self.op in ("charge", "reserve"):
            _service_units_or_amount(self)
        elif self.op == "grant":
            _a_lot(self)
        settings = _limits(info)
        if self.reply_to is not None:
            keys = keys_of(self.account, settings)
            if not keys.owns_reply_stream(self.reply_to):
                raise PydanticCustomError(
                    "invalid_reply_to", "reply_to must be a key {prefix}<id> in the account's partition",
                    {"prefix": keys.reply("")},
                )
        return self

    @property
    def reservation_id(self) -> str | None:
        """The reservation this request makes (reserve) or acts on; None for a charge."""
        if self.op == "reserve":
            return f"{self.account}/{self.request_id}"
        return self.reservation

    @property
    def fingerprint(self) -> str:
        """What a replay of this request id must match to count as the same request."""
        if self.op == "charge":
            if self.amount is not None:
                return f"{self.account}|amount|{self.amount}"
            return f"{self.account}|{self.service}|{self.units}"
        parts = (self.service, self.units, self.amount, self.reservation, self.ttl)
        if self.op == "grant":
            parts += (self.lot, self.expires_at, self.expires_in)
        return "|".join([self.account, self.op, *("" if p is None else str(p) for p in parts)])

    def to_fields(self) -> dict[str, str]:
        """The entry as XADDed to the request stream (a charge without the op field)."""
        fields = {k: str(v) for k, v in self.model_dump(exclude_none=True).items()}
        if self.op == "charge":
            del fields["op"]
        return fields


def account_of(fields: Mapping[str, Any]) -> str | None:
    """The account a request (not yet validated) is routed by: the account part of its
    reservation for a commit, extend or release, else its account field."""
    reservation = fields.get("reservation")
    if fields.get("op") in ON_RESERVATION and isinstance(reservation, str) and "/" in reservation:
        return reservation.split("/", 1)[0]
    account = fields.get("account")
    return None if account is None else str(account)


def _service_units_or_amount(request: ChargeRequest) -> None:
    if request.amount is not None and (request.service is not None or request.units is not None):
        raise PydanticCustomError("ambiguous_charge", "give either amount or service with units, not both")
    if request.amount is None and (request.service is None or request.units is None):
        missing = "units" if request.service is not None else "service"
        raise PydanticCustomError("missing_field", "field '{name}' is required (or give amount)", {"name": missing})


def _a_lot(request: ChargeRequest) -> None:
    """A grant: its lot, money or units of a service, at most one expiry, not already past
    (by this clock; the library judges by the server's when it reads the entry)."""
    if request.lot is None:
        raise PydanticCustomError("missing_field", "field 'lot' is required for op 'grant'")
    if request.amount is not None and request.units is not None:
        raise PydanticCustomError("ambiguous_charge", "give either amount or service with units, not both")
    if request.amount is None and request.units is None:
        raise PydanticCustomError("missing_field", "field 'amount' is required for op 'grant' (or units)")
    if request.units is not None and request.service is None:
        raise PydanticCustomError("missing_field", "field 'service' is required with units")
    if request.expires_at is not None and request.expires_in is not None:
        raise PydanticCustomError("invalid_expiry", "give expires_at or expires_in, not both")
    if request.expires_at is not None and request.expires_at <= time.time() * 1000:
        raise PydanticCustomError("invalid_expiry", "expires_at is not later than now")


def _one_of_units_or_amount(request: ChargeRequest) -> None:
    """A commit or extend counts in the reservation's units, or in minor units."""
    if request.amount is not None and request.units is not None:
        raise PydanticCustomError("ambiguous_charge", "give either amount or units, not both")
    if request.amount is None and request.units is None:
        raise PydanticCustomError("missing_field", "field 'units' is required for op '{op}' (or give amount)",
                                  {"op": request.op})


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


class EntryFields(dict):
    """A stream entry's fields as this project's clients read them (charging/connection.py): a
    dict, as redis-py gives them, that also keeps ``pairs``, the (name, value) pairs as Redis
    sent them. XADD takes a field name twice; a dict keeps its last value and hides the rest."""

    def __init__(self, flat: list | None = None):
        pairs = list(zip(flat[::2], flat[1::2])) if flat else []
        super().__init__(pairs)
        self.pairs = pairs


def field_pairs(fields: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None) -> list[tuple[Any, Any]]:
    """The (name, value) pairs of an entry: every pair of a stream entry (EntryFields), a repeated
    name included, or the items of a mapping (JSON, keyword arguments)."""
    if fields is None:
        return []
    if isinstance(fields, EntryFields):
        return fields.pairs
    if isinstance(fields, Mapping):
        return list(fields.items())
    return list(fields)


def parse_request(fields: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None, settings: Settings) -> ChargeRequest:
    """Validate a request from a stream entry (bytes, EntryFields or its pairs) or from JSON /
    keyword arguments. The field-count limit counts pairs, and a name given twice is refused:
    the entry does not say which value it means.

    Raises Invalid with a reason code; never anything else for bad input.
    """
    pairs = field_pairs(fields)
    if not pairs:
        raise Invalid("entry_deleted", "the entry has no fields (deleted or trimmed before it was read)")
    if len(pairs) > MAX_FIELDS:
        raise Invalid("too_many_fields", f"{len(pairs)} fields, at most {MAX_FIELDS}")
    data = {}
    for key, value in pairs:
        name = _text(key, "field name")
        if name in data:
            times = Counter(_text(k, "field name") for k, _ in pairs)[name]
            raise Invalid("duplicate_field", f"field '{name}' is given {times} times")
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
        return Invalid("missing_field", f"field '{name}' is required")
    if error["type"] == "extra_forbidden":
        return Invalid("unknown_field", f"field '{name}' is not part of the request format")
    if error["type"] in _MODEL_REASONS:
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
    # Reservation operations only (None for a charge): the operation, the reservation id,
    # the account's total held after it, and the reservation as it left it (or as it was
    # when it closed): its amount and expiry (ms since the epoch).
    op: str | None = None
    reservation: str | None = None
    held: int | None = None
    reserved: int | None = None
    expires_at: int | None = None
    # What each credit lot gave ('sms100:4u,promo:6,main:3'; docs/plans-and-lots.md), when
    # a lot besides the main balance did.
    draws: str | None = None
    # A grant (op 'grant'): its lot and what it granted now (0: the lot was granted before,
    # with the same content); a lot's expiry (op 'expire', status 'expired'): the lot, and
    # what was left in it.
    lot: str | None = None
    breakage: int | None = None
    granted: int | None = None

    @property
    def available(self) -> int | None:
        return None if self.held is None else self.balance - self.held

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
            op=f.get("op"), reservation=f.get("reservation"), held=_int(f.get("held")),
            reserved=_int(f.get("reserved")), expires_at=_int(f.get("expires_at")), draws=f.get("draws"),
            lot=f.get("lot"), breakage=_int(f.get("breakage")), granted=_int(f.get("granted")),
        )

    def as_dict(self) -> dict[str, Any]:
        made = {
            "request_id": self.request_id, "account": self.account, "status": self.status,
            "reason": self.reason, "charged": self.charged, "balance": self.balance,
            "duplicate": self.duplicate, "submitted_at": self.submitted_at, "processed_at": self.processed_at,
        }
        if self.op == "grant":
            return made | {"op": self.op, "lot": self.lot, "granted": self.granted, "expires_at": self.expires_at}
        if self.op == "expire":
            return made | {"op": self.op, "lot": self.lot, "breakage": self.breakage}
        return made | ({} if self.op is None else {
            "op": self.op, "reservation": self.reservation, "held": self.held, "available": self.available,
            "reserved": self.reserved, "expires_at": self.expires_at,
        }) | ({} if self.draws is None else {"draws": self.draws})


def _int(value: str | None) -> int | None:
    return int(value) if value else None
