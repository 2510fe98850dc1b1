"""Bad entries, written raw with XADD as a buggy or hostile producer in any language could:
malformed, wrong types, oversized, out of range, aimed at other keys. Each kind names the
dead-letter reason the worker must give it (docs/wire-format.md); the checker holds the
worker to that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis

from charging.app.audit import entry_key
from charging.keys import Keys, keys_of, partition_of
from charging.settings import Settings

Fields = dict[str | bytes, str | bytes]


@dataclass(frozen=True)
class BadKind:
    name: str
    reason: str
    build: Callable[[dict[str, str], Settings], Fields]


def _with(**changes: str | bytes) -> Callable[[dict[str, str], Settings], Fields]:
    return lambda good, _: {**good, **changes}


def _without(name: str) -> Callable[[dict[str, str], Settings], Fields]:
    return lambda good, _: {k: v for k, v in good.items() if k != name}


def _amount(value: Callable[[Settings], str]) -> Callable[[dict[str, str], Settings], Fields]:
    return lambda good, settings: {"request_id": good["request_id"], "account": good["account"],
                                   "amount": value(settings)}


def _reply_to_balances(good: dict[str, str], settings: Settings) -> Fields:
    """Tries to make the worker XADD outcomes into the balances hash of the account's own slot."""
    keys = keys_of(good["account"], settings)
    return {**good, "reply_to": keys.balances}


KINDS = [
    BadKind("missing request_id", "missing_field", _without("request_id")),
    BadKind("missing account", "missing_field", _without("account")),
    BadKind("missing units", "missing_field", _without("units")),
    BadKind("float units", "invalid_units", _with(units="1.5")),
    BadKind("zero units", "invalid_units", _with(units="0")),
    BadKind("negative units", "invalid_units", _with(units="-3")),
    BadKind("exponent units", "invalid_units", _with(units="1e9999")),
    BadKind("NaN units", "invalid_units", _with(units="NaN")),
    BadKind("hex units", "invalid_units", _with(units="0x10")),
    BadKind("JSON list as units", "invalid_units", _with(units="[1]")),
    BadKind("units over the maximum", "invalid_units", lambda good, s: {**good, "units": str(s.max_units + 1)}),
    BadKind("unknown service", "unknown_service", _with(service="mms")),
    BadKind("service in capitals", "unknown_service", _with(service="SMS")),
    BadKind("zero amount", "invalid_amount", _amount(lambda s: "0")),
    BadKind("negative amount", "invalid_amount", _amount(lambda s: "-5")),
    BadKind("amount over the maximum", "invalid_amount", _amount(lambda s: str(s.max_amount + 1))),
    BadKind("amount and units", "ambiguous_charge", _with(amount="5")),
    BadKind("non-UTF-8 account", "invalid_encoding", _with(account=b"\xff\xfe")),
    BadKind("non-UTF-8 field name", "invalid_encoding", lambda good, _: {**good, b"\xc3\x28": "1"}),
    BadKind("oversized value (64 KiB)", "field_too_long", _with(account="a" * 65_536)),
    BadKind("oversized field name", "field_too_long", lambda good, _: {**good, "x" * 300: "1"}),
    BadKind("Lua injection as account", "invalid_account", _with(account="a'); redis.call('FLUSHALL') --")),
    BadKind("non-ASCII account", "invalid_account", _with(account="счёт")),
    BadKind("request id over 128 chars", "invalid_request_id", lambda good, _: {**good, "request_id": "r" * 129}),
    BadKind("empty request id", "invalid_request_id", _with(request_id="")),
    BadKind("NUL byte in request id", "invalid_request_id", lambda good, _: {**good, "request_id": "a\x00b"}),
    BadKind("unknown field", "unknown_field", _with(unit="1")),
    BadKind("forged dead-letter fields", "unknown_field", _with(error="none", entry_id="0-1")),
    BadKind("reply_to at the balances hash", "invalid_reply_to", _reply_to_balances),
    BadKind("negative submitted_at", "invalid_submitted_at", _with(submitted_at="-1")),
    BadKind("submitted_at in year 33658", "invalid_submitted_at", _with(submitted_at=str(10**15))),
    BadKind("too many fields", "too_many_fields", lambda good, _: {**good, **{f"x{i}": "1" for i in range(20)}}),
    BadKind("account of another partition", "wrong_partition", _with()),
]


def partition_for(kind: BadKind, account: str, settings: Settings) -> int:
    """The account's partition; the next one for a wrong-partition entry."""
    partition = partition_of(account, settings.partitions)
    return (partition + 1) % settings.partitions if kind.reason == "wrong_partition" else partition


def write(client: redis.Redis, settings: Settings, kind: BadKind, request_id: str, account: str) -> str:
    """XADD one bad entry raw (no validation on the way in); returns its entry_key()."""
    good = {"request_id": request_id, "account": account, "service": "sms", "units": "1"}
    partition = partition_for(kind, account, settings)
    entry_id = client.xadd(Keys(settings.namespace, partition).requests, kind.build(good, settings))
    return entry_key(partition, entry_id.decode())
