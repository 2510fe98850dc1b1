"""Credit lots (docs/plans-and-lots.md): a grant as an operator gives it, checked before it
reaches the library, and what an account holds (its lots, its breakage) as an operator
reads it. Spending and expiring lots is done only by the functions in lua/."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from charging import codec
from charging.keys import keys_of
from charging.plan import Plan
from charging.schema import ACCOUNT_PATTERN, LOT_PATTERN, MAIN_LOT, Invalid
from charging.settings import LIBRARY_MAX_BALANCE, LIBRARY_MAX_DURATION_S, SERVICES, Settings

DEFAULT_PLAN = "default"  # the tariff of the process that rates a charge: no stored plan
_DURATION = re.compile(r"([0-9]{1,15})(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class Grant:
    """A grant as the library takes it: kind 'money' (quantity in minor units) or 'units'
    (of service); at most one of expires_at (ms since the epoch) and expires_in_ms."""

    account: str
    lot: str
    kind: str
    quantity: int
    service: str | None = None
    expires_at: int | None = None
    expires_in_ms: int | None = None


# The library's refusals that name what the input got wrong (the rest are about the state:
# unknown_account, too_many_lots, idempotency_conflict).
_BAD_INPUT = {"unknown_service", "missing_service", "unknown_plan"}


def reason_of(error: Exception) -> str:
    """The reason code a refusal of the library starts with."""
    return str(error).split(" ", 1)[0].rstrip(":")


def is_bad_input(reason: str) -> bool:
    return reason.startswith("invalid_") or reason in _BAD_INPUT


def wall_clock_ms() -> int:
    """This machine's clock, to refuse an expiry already past before it is sent (the
    library judges it again by the server's clock)."""
    return int(time.time() * 1000)


def parse_grant(fields: Mapping[str, Any], settings: Settings, now_ms: int) -> Grant:
    """A grant from account, lot, amount or units, service, expires_in ('30d', '12h', '90m',
    '45s', '1500ms') and expires_at (ISO-8601 with a timezone), None where not given. Raises
    Invalid with the reason the library would refuse it with."""
    account, lot = fields.get("account"), fields.get("lot")
    if not isinstance(account, str) or not re.fullmatch(ACCOUNT_PATTERN, account):
        raise Invalid("invalid_account", "an account is 1..64 of A-Z a-z 0-9 _ . : -")
    if not isinstance(lot, str) or not re.fullmatch(LOT_PATTERN, lot) or lot == MAIN_LOT:
        raise Invalid("invalid_lot", f"a lot id is 1..64 of A-Z a-z 0-9 _ . - and not {MAIN_LOT!r}, got {lot!r}")
    kind, quantity = _quantity(fields, settings)
    service = _service(fields.get("service"), kind)
    expires_at, expires_in = fields.get("expires_at"), fields.get("expires_in")
    if expires_at is not None and expires_in is not None:
        raise Invalid("invalid_expiry", "give expires_at or expires_in, not both")
    return Grant(account, lot, kind, quantity, service,
                 None if expires_at is None else instant_ms(expires_at, now_ms),
                 None if expires_in is None else duration_ms(expires_in))


def _quantity(fields: Mapping[str, Any], settings: Settings) -> tuple[str, int]:
    amount, units = fields.get("amount"), fields.get("units")
    if (amount is None) == (units is None):
        raise Invalid("invalid_kind", "give either an amount (money) or units (of a service)")
    if amount is not None:
        return "money", _whole("invalid_amount", "amount", amount, settings.max_amount)
    return "units", _whole("invalid_units", "units", units, LIBRARY_MAX_BALANCE)


def whole(value: Any) -> int | None:
    """A whole number written in digits, or a JSON integer; None for anything else (a sign,
    a fraction, an exponent, a bool)."""
    if type(value) is int:
        return value
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None


def _whole(reason: str, name: str, value: Any, maximum: int) -> int:
    number = whole(value)
    if number is None or not 1 <= number <= maximum:
        raise Invalid(reason, f"{name} must be a whole number between 1 and {maximum}, got {value!r}")
    return number


def _service(service: Any, kind: str) -> str | None:
    if service is None:
        if kind == "units":
            raise Invalid("missing_service", "units are units of a service: give the service (sms, voice or data)")
        return None
    if service not in SERVICES:
        raise Invalid("unknown_service", f"service must be one of {', '.join(SERVICES)}, got {service!r}")
    return str(service)


def duration_ms(text: Any) -> int:
    """'30d', '12h', '90m', '45s', '1500ms' in ms: more than 0, at most ten years."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise Invalid("invalid_expiry", f"expires_in is a whole number and one of ms, s, m, h, d (30d), got {text!r}")
    ms = int(match[1]) * _UNIT_MS[match[2]]
    if not 0 < ms <= LIBRARY_MAX_DURATION_S * 1000:
        raise Invalid("invalid_expiry", f"expires_in must be more than 0 and at most ten years, got {text!r}")
    return ms


def instant_ms(text: Any, now_ms: int) -> int:
    """An ISO-8601 time with a timezone (2030-01-06T00:00:00Z) in ms since the epoch, after now_ms."""
    try:
        when = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise Invalid("invalid_expiry", f"expires_at is an ISO-8601 time with a timezone "
                                        f"(2030-01-06T00:00:00Z), got {text!r}")
    ms = int(when.timestamp() * 1000)
    if ms <= now_ms:
        raise Invalid("invalid_expiry", f"expires_at {text} is in the past")
    return ms


@dataclass(frozen=True)
class Holdings:
    """What an account holds besides its main balance: its plan ('default' when on none),
    its lots as stored (one whose expiry has passed stays until a call or the sweep records
    its breakage) and its breakage so far: 'money', and each service with units broken."""

    plan: str
    lots: list[codec.Lot]
    breakage: dict[str, int]
    now_ms: int

    def expired(self, lot: codec.Lot) -> bool:
        """A lot counts while its expiry is after now (the library's rule)."""
        return lot.expires_at is not None and lot.expires_at <= self.now_ms

    @property
    def money(self) -> int:
        """What the money lots add to the balance: what is left of those that count, and
        what reservations hold of those that have expired (theirs until they end)."""
        return sum(lot.held if self.expired(lot) else lot.left for lot in self.lots if lot.kind == "money")

    @property
    def money_held(self) -> int:
        return sum(lot.held for lot in self.lots if lot.kind == "money")


def holdings_reading(settings: Settings, account: str) -> Plan[Holdings]:
    """An account's plan, lots and breakage with the server's time, as a plan for the sync
    and the asyncio client."""
    keys = keys_of(account, settings)
    seconds, micros = yield lambda client: client.time()
    stored = codec.wallet((yield lambda client: client.hget(keys.wallets, account)))
    breakage = {"money": stored.breakage, **stored.breakage_units}
    return Holdings(stored.plan or DEFAULT_PLAN, list(stored.lots), {k: n for k, n in breakage.items() if n},
                    int(seconds) * 1000 + int(micros) // 1000)


def granting(settings: Settings, grant: Grant) -> Plan[codec.Granted]:
    """Grant the lot. Raises redis.ResponseError with the library's reason."""
    return codec.granting(settings, grant.account, grant.lot, grant.kind, grant.quantity, grant.service,
                          grant.expires_at, grant.expires_in_ms)


def granted_data(grant: Grant, granted: codec.Granted) -> dict[str, Any]:
    return {"account": grant.account, "lot": granted.lot, "status": granted.status, "kind": grant.kind,
            "service": grant.service, "left": granted.left, "expires_at": granted.expires_at}


def account_data(account: str, main: int, main_held: int, holdings: Holdings) -> dict[str, Any]:
    """An account as `accounts show --json` and GET /v1/accounts/{account} show it. balance
    and held are the account's money as an outcome counts it: the main balance and what it
    holds, with the money lots'."""
    balance, held = main + holdings.money, main_held + holdings.money_held
    lots = [{"lot": lot.id, "kind": lot.kind, "service": lot.service or None, "granted": lot.granted,
             "left": lot.left, "held": lot.held, "expires_at": lot.expires_at, "expired": holdings.expired(lot)}
            for lot in holdings.lots]
    return {"account": account, "balance": balance, "held": held, "available": balance - held,
            "plan": holdings.plan, "lots": lots, "breakage": holdings.breakage}
