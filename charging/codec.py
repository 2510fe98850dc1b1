"""The Lua contract in Python: the only place that knows the keys, the arguments and the
reply of every function in lua/charging.lua, by position.

Each call helper queues one FCALL on ``target``, a client or a pipeline, so a worker can put
a whole batch in one round trip and authorize can make a single call with the same code.
Each parser turns a raw reply into a named value; nothing outside this module indexes one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from charging.keys import Keys, keys_of
from charging.plan import Plan, pipelined, run
from charging.schema import ChargeRequest, Outcome
from charging.settings import SERVICES, Settings
from charging.streams import text
from charging.tariff import unit_price

DEADLETTER_FIELD_BYTES = 1024  # lua/charging.lua keeps an oversized field of a dead letter only up to this
SET_BALANCES_CHUNK = 1000  # accounts per set_balances call: bounded argument lists
RESERVATION_SEP = "\x1f"  # lua/charging.lua packs records (reservations, dedupe records) with this separator


# ---- settling: charge, reserve, commit, extend, release, pump ----------------------------

# The 14 ARGV of a settling function by name, in the order lua/charging.lua `settle` reads them.
SETTLE_ARGUMENTS = ("request_id", "account", "fingerprint", "entry_id", "group", "window_ms", "submitted_at",
                    "reply_ttl_ms", "amount", "units", "unit_price", "reservation", "ttl_ms", "service")
RATED_OPS = ("charge", "reserve")  # their units are priced by the account's plan when settled


def partition_keys(keys: Keys) -> list[str]:
    """The partition's keys every settling call shares, in the order the library takes them."""
    return [keys.balances, keys.results, keys.requests, keys.held, keys.reservations, keys.expiries, keys.holds,
            keys.wallets, keys.lot_expiries, keys.plans]


def settle_keys(keys: Keys, reply_to: str | None = None) -> list[str]:
    """The KEYS of a settling function, in the order lua/charging.lua `settle` reads them."""
    names = partition_keys(keys)
    return names + [reply_to] if reply_to else names


def settle_arguments(settings: Settings, request: ChargeRequest, amount: int | None, entry_id: str = "",
                     given: Mapping[str, Any] | None = None) -> list:
    """The 14 ARGV of a settling function. amount: None to let the library price units of a
    charge or reserve by the account's plan (the tariff is the default plan's price) and for
    a commit or extend in units and a release; else the amount the request is worth (a
    price the caller rated: the library takes it as it is). entry_id: '' (today's library
    settles entries only through pump; the bench's frozen library takes one, and the first
    13 arguments). given: values by name (SETTLE_ARGUMENTS) in place of those the settings
    and the request make, for tests that drive the library with millisecond ttls or
    malformed values."""
    reserve = request.op == "reserve"
    rated = amount is None and request.op in RATED_OPS and request.service is not None
    ttl_s = request.ttl or (settings.reservation_ttl_s if reserve else None)
    values = {
        "request_id": request.request_id, "account": request.account, "fingerprint": request.fingerprint,
        "entry_id": entry_id, "group": settings.group, "window_ms": settings.dedupe_window_ms,
        "submitted_at": request.submitted_at or "", "reply_ttl_ms": settings.reply_ttl_s * 1000,
        "amount": "" if amount is None else amount,
        "units": request.units if amount is None and request.units is not None else "",
        "unit_price": unit_price(request, settings) if reserve or rated else "",
        "reservation": request.reservation_id or "",
        "ttl_ms": "" if ttl_s is None else ttl_s * 1000,
        "service": request.service if rated else "",
    }
    if unknown := set(given or ()) - set(values):
        raise TypeError(f"not arguments of a settling function: {sorted(unknown)}")
    values.update(given or ())
    return [values[name] for name in SETTLE_ARGUMENTS]


def settle(target, settings: Settings, request: ChargeRequest, amount: int | None,
           given: Mapping[str, Any] | None = None):
    """Queue the function of the request's op (charge, reserve, commit, extend, release): a
    synchronous call, which settles no stream entry. amount, given: see settle_arguments."""
    names = settle_keys(keys_of(request.account, settings), request.reply_to)
    return target.fcall(request.op, len(names), *names, *settle_arguments(settings, request, amount, given=given))


def entries_header(settings: Settings, keys: Keys) -> list:
    """The 15 ARGV of pump after its own four: the group, the dedupe window, the reply
    ttl, the partition and the partition count, the dead-letter maxlen, the tariff and the
    limits the library judges an entry by."""
    return [settings.group, settings.dedupe_window_ms, settings.reply_ttl_s * 1000, keys.partition,
            settings.partitions, settings.deadletter_maxlen, *(settings.tariff[s] for s in SERVICES),
            settings.max_units, settings.max_amount, settings.max_reservation_ttl_s, settings.reservation_ttl_s,
            settings.max_deliveries, settings.max_clock_skew_ms]


def entries_keys(keys: Keys) -> list[str]:
    """The 12 KEYS of pump."""
    return [*partition_keys(keys), keys.deadletter, keys.deadletter_reasons]


def pump(target, settings: Settings, keys: Keys, consumer: str, count: int, reclaim_idle_ms: int = 0,
         waited: str = ""):
    """Queue one FCALL of pump: the library reclaims (reclaim_idle_ms > 0), reads up to count
    of consumer's own pending and new entries of the partition, and judges, rates and
    settles them itself. waited: the id of an entry the worker's blocking read delivered
    (that delivery was no try). Read its reply with summary()."""
    names = entries_keys(keys)
    return target.fcall("pump", len(names), *names, consumer, count, reclaim_idle_ms, waited,
                        *entries_header(settings, keys))


@dataclass(frozen=True)
class Summary:
    """What one pump call did. approved, duplicate and rejected count charges; reservation
    operations are counted in operations by (op, result): approved, duplicate or the
    rejection reason. refused: entries that wrote nothing and stay pending; error: the
    first refusal's text."""

    read: int = 0
    reclaimed: int = 0
    last_id: str = ""
    approved: int = 0
    duplicate: int = 0
    refused: int = 0
    error: str = ""
    rejected: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    operations: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def settled(self) -> int:
        return self.read - self.refused


def summary(reply: Sequence[Any]) -> Summary:
    """Parse pump's flat reply (lua/charging.lua, pump)."""
    read, reclaimed, last_id, approved, duplicate, refused, error, *rest = reply
    groups: list[dict] = []
    at = 0
    for width in (1, 1, 2):  # labels per count: reason, reason, (op, result)
        found: dict = {}
        for _ in range(int(rest[at])):
            labels = tuple(text(label) for label in rest[at + 1:at + 1 + width])
            found[labels[0] if width == 1 else labels] = int(rest[at + 1 + width])
            at += width + 1
        groups.append(found)
        at += 1
    return Summary(int(read), int(reclaimed), text(last_id), int(approved), int(duplicate), int(refused),
                   text(error), *groups)


@dataclass(frozen=True)
class Settled:
    """The reply of a settling function for one request."""

    status: str
    reason: str = ""
    charged: int = 0
    balance: int = 0
    duplicate: bool = False
    processed_at: int = 0
    # Reservation operations only: the account's held total after, and the reservation.
    held: int | None = None
    reserved: int | None = None
    expires_at: int | None = None
    # What each lot gave ('sms100:4u,promo:6,main:3'), '' when only the main balance did.
    draws: str = ""

    @property
    def replayed(self) -> bool:
        """Answered from the dedupe record (an idempotency conflict is a rejection, not a replay)."""
        return self.duplicate and self.reason != "idempotency_conflict"


def settled(reply: Sequence[Any]) -> Settled:
    """Parse {status, reason, charged, balance, duplicate, processed_at[, held, reserved,
    expires_at], draws}."""
    status, reason, charged, balance, duplicate, processed_at, *session, draws = reply
    parsed = Settled(text(status), text(reason), int(charged), int(balance), bool(int(duplicate)),
                     int(processed_at), draws=text(draws))
    if not session:
        return parsed
    held, reserved, expires_at = session
    return replace(parsed, held=int(held), reserved=int(reserved), expires_at=_number(text(expires_at)))


def outcome(request: ChargeRequest, result: Settled) -> Outcome:
    """The outcome of a request settled synchronously, as a worker would post it."""
    made = Outcome(
        request_id=request.request_id, account=request.account, status=result.status, reason=result.reason,
        charged=result.charged, balance=result.balance, duplicate=result.duplicate,
        submitted_at=request.submitted_at, processed_at=result.processed_at, draws=result.draws or None,
    )
    if request.op == "charge":
        return made
    return replace(made, op=request.op, reservation=request.reservation_id, held=result.held,
                   reserved=result.reserved, expires_at=result.expires_at)


# ---- balances, upkeep ----------------------------------------------------------------------

def top_up(client: redis.Redis, settings: Settings, account: str, amount: int) -> int:
    """Add amount to an existing account; the new balance. Raises redis.ResponseError
    unknown_account / balance_too_large (over the library's limit, 10^15)."""
    keys = keys_of(account, settings)
    return int(client.fcall("top_up", 2, keys.balances, keys.wallets, account, amount))


def set_balances(client: redis.Redis, settings: Settings, balances: Iterable[tuple[str, int]]) -> int:
    """Create or overwrite accounts, one pipeline; how many were set. Raises
    redis.ResponseError invalid_account / invalid_balance / balance_too_large, and a call
    so refused sets none of its accounts."""
    return run(client, setting_balances(settings, balances))


def setting_balances(settings: Settings, balances: Iterable[tuple[str, int]]) -> Plan[int]:
    """set_balances as a plan, for the sync and the asyncio client."""
    by_partition: dict[Keys, list] = defaultdict(list)
    for account, balance in balances:
        by_partition[keys_of(account, settings)].extend((account, balance))

    def queue(pipe) -> None:
        for keys, pairs in by_partition.items():
            for start in range(0, len(pairs), 2 * SET_BALANCES_CHUNK):
                pipe.fcall("set_balances", 2, keys.balances, keys.wallets, *pairs[start:start + 2 * SET_BALANCES_CHUNK])
    return sum(int(n) for n in (yield pipelined(queue)))


def expire_reservations(target, settings: Settings, keys: Keys) -> int:
    """The sweep: release up to sweep_batch reservations of the partition whose expiry has
    passed, and record the breakage of up to sweep_batch lots that have expired (with
    every other of the same accounts). How many reservations it released."""
    names = [keys.balances, keys.results, keys.held, keys.reservations, keys.expiries, keys.holds, keys.wallets,
             keys.lot_expiries]
    return target.fcall("expire_reservations", len(names), *names, settings.sweep_batch)


def trim_requests(target, settings: Settings, keys: Keys):
    """Drop request entries the workers' group has acked. Only that group counts: another
    group on the stream (a stray one, which no worker reads) would keep them all for good."""
    return target.fcall("trim", 1, keys.requests, 0, settings.group)


def trim_results(target, settings: Settings, keys: Keys):
    """Keep about results_maxlen outcomes, never dropping one a group named in
    results_groups has not read and acked."""
    return target.fcall("trim", 1, keys.results, settings.results_maxlen, *settings.results_group_names)


def repair(target, settings: Settings, keys: Keys) -> tuple[int, bool]:
    """Record request entries removed before the workers read them, and rewind a request
    stream whose ids a client pushed into the future once the workers' group has settled
    it (no other group can hold that back): (entries found removed, whether it was rewound)."""
    removed, rewound = target.fcall("repair", 3, keys.requests, keys.deadletter, keys.deadletter_reasons,
                                    settings.max_clock_skew_ms, settings.deadletter_maxlen, settings.group)
    return int(removed), bool(rewound)


# ---- plans and credit lots (docs/plans-and-lots.md) -----------------------------------------

WALLET_SEP = "\x1e"  # lua/charging.lua packs a wallet's records with this, each record's fields with RESERVATION_SEP


def set_plan(target, keys: Keys, name: str, prices: Mapping[str, int]):
    """Queue set_plan on one partition (a plan is kept by every partition: set each)."""
    return target.fcall("set_plan", 1, keys.plans, name, *(prices[s] for s in SERVICES))


def assign_plan(client: redis.Redis, settings: Settings, account: str, plan: str) -> str:
    """Put an account on a plan ('default': take it off its plan). Raises redis.ResponseError
    invalid_account / unknown_account / invalid_plan / unknown_plan."""
    return run(client, assigning_plan(settings, account, plan))


def assigning_plan(settings: Settings, account: str, plan: str) -> Plan[str]:
    """assign_plan as a plan, for the sync and the asyncio client."""
    keys = keys_of(account, settings)
    return text((yield lambda client: client.fcall("assign_plan", 3, keys.balances, keys.wallets, keys.plans,
                                                   account, plan)))


def plan_prices(packed: bytes | str) -> dict[str, int]:
    """Parse a stored plan (a field of <ns>:{pN}:plans): its price of each service."""
    return dict(zip(SERVICES, (int(price) for price in text(packed).split(RESERVATION_SEP))))


@dataclass(frozen=True)
class Granted:
    """The reply of grant: status granted or duplicate (the lot was granted before with the
    same content; nothing granted now), the lot as it is."""

    status: str
    lot: str
    left: int
    expires_at: int | None


def grant(client: redis.Redis, settings: Settings, account: str, lot: str, kind: str, quantity: int,
          service: str | None = None, expires_at: int | None = None, expires_in_ms: int | None = None) -> Granted:
    """Give an account a credit lot (kind money or units). Raises redis.ResponseError whose
    text starts with the reason: invalid_account, unknown_account, invalid_lot, invalid_kind,
    invalid_amount, invalid_units, unknown_service, missing_service, invalid_expiry,
    too_many_lots, idempotency_conflict."""
    return run(client, granting(settings, account, lot, kind, quantity, service, expires_at, expires_in_ms))


def granting(settings: Settings, account: str, lot: str, kind: str, quantity: int, service: str | None = None,
             expires_at: int | None = None, expires_in_ms: int | None = None) -> Plan[Granted]:
    """grant as a plan, for the sync and the asyncio client."""
    keys = keys_of(account, settings)
    names = [keys.balances, keys.wallets, keys.lot_expiries, keys.results]
    status, lot_id, left, expires = yield lambda client: client.fcall(
        "grant", len(names), *names, account, lot, kind, quantity, service or "",
        "" if expires_at is None else expires_at, "" if expires_in_ms is None else expires_in_ms)
    return Granted(text(status), text(lot_id), int(left), _number(text(expires)))


@dataclass(frozen=True)
class Lot:
    """A credit lot as lua/charging.lua stores it in a wallet. left includes held (what open
    reservations pin); expires_at None: never; spec: the expiry as the grant gave it."""

    id: str
    kind: str
    service: str
    granted: int
    left: int
    held: int
    expires_at: int | None
    spec: str


@dataclass(frozen=True)
class Wallet:
    """An account's plan ('' the default plan), breakage ever recorded (money, and units by
    service) and lots, in the order granted."""

    plan: str = ""
    breakage: int = 0
    breakage_units: dict[str, int] = field(default_factory=dict)
    lots: tuple[Lot, ...] = ()


def wallet(packed: bytes | str | None) -> Wallet:
    """Parse a stored wallet (None: the account has none)."""
    if packed is None:
        return Wallet()
    head, *records = text(packed).split(WALLET_SEP)
    plan, money, *units = head.split(RESERVATION_SEP)
    lots = []
    for record in records:
        lot_id, kind, service, granted, left, held, expires_at, spec = record.split(RESERVATION_SEP)
        lots.append(Lot(lot_id, kind, service, int(granted), int(left), int(held), _number(expires_at), spec))
    return Wallet(plan, int(money), dict(zip(SERVICES, (int(u) for u in units))), tuple(lots))


# ---- stored records ------------------------------------------------------------------------

@dataclass(frozen=True)
class Reservation:
    """An open reservation as lua/charging.lua stores it (write_reservation). service: what
    it was reserved for ('' an amount); draws: what it pins of each lot ('main' the main
    balance), as (lot, quantity, in units)."""

    account: str
    amount: int
    expires_at: int
    unit_price: int
    ttl_ms: int
    service: str = ""
    draws: tuple[tuple[str, int, bool], ...] = ()

    @property
    def main(self) -> int:
        """What it holds of the main balance: its part of the account's held total."""
        return sum(qty for lot, qty, _ in self.draws if lot == "main")


def reservation(packed: bytes | str) -> Reservation:
    account, amount, expires_at, price, ttl_ms, *rest = text(packed).split(RESERVATION_SEP)
    service, draws = rest if rest else ("", f"main:{amount}")
    return Reservation(account, int(amount), int(expires_at), int(price), int(ttl_ms), service, parse_draws(draws))


def parse_draws(text_: str) -> tuple[tuple[str, int, bool], ...]:
    """'sms100:4u,promo:6,main:3' -> (('sms100', 4, True), ('promo', 6, False), ('main', 3, False))."""
    parsed = []
    for part in filter(None, text_.split(",")):
        lot, _, quantity = part.rpartition(":")
        parsed.append((lot, int(quantity.rstrip("u")), quantity.endswith("u")))
    return tuple(parsed)


@dataclass(frozen=True)
class Recorded:
    """The outcome a dedupe record (a field of ``<ns>:{pN}:dedupe:<slice>:<slot>``,
    lua/charging.lua record()) keeps for the dedupe window: what a replay of the request id is answered with.
    It keeps no times. op, held, reserved and expires_at for reservation operations only."""

    request_id: str
    account: str
    status: str
    reason: str
    charged: int
    balance: int
    op: str = "charge"
    held: int | None = None
    reserved: int | None = None
    expires_at: int | None = None


def recorded(request_id: str, packed: bytes | str) -> Recorded:
    """Parse a dedupe record (a bucket's without the time it was settled, which opens it):
    the request's fingerprint (its account first; the op second for a reservation
    operation), then status, reason, charged, balance[, held, reserved, expires_at]."""
    fingerprint, status, reason, charged, balance, *session = text(packed).split(RESERVATION_SEP)
    account, op = fingerprint.split("|")[:2]
    made = Recorded(request_id, account, status, reason, int(charged), int(balance))
    if not session:
        return made
    held, reserved, expires_at = session
    return replace(made, op=op, held=int(held), reserved=int(reserved), expires_at=_number(expires_at))


DEDUPE_SLICES = 4  # a slice is at least this fraction of the window (lua/charging.lua, slice_of)


def dedupe_slice(window_ms: int) -> int:
    """The slice of a window's buckets: the power of two of ms that is at least a quarter of it."""
    slice_ms = 1
    while slice_ms * DEDUPE_SLICES < window_ms:
        slice_ms *= 2
    return slice_ms


def dedupe_buckets(keys: Keys, window_ms: int, now_ms: int) -> list[str]:
    """The buckets that may hold the record of a request settled within window_ms before
    now_ms, and the one after now's (lua/charging.lua, slots()), newest first."""
    slice_ms = dedupe_slice(window_ms)
    first, last = (now_ms - window_ms) // slice_ms, now_ms // slice_ms + 1
    return [keys.dedupe(slice_ms, slot) for slot in range(last, first - 1, -1)]


def find_records(settings: Settings, places: Sequence[Keys], request_id: str) -> Plan[list[Recorded]]:
    """The outcome recorded for request_id within the dedupe window, in each partition of
    places that has one, as a settling call would find it: the newest record of the
    buckets if the window still covers it. Two round trips: the server's time, then every
    lookup."""
    seconds, micros = yield lambda client: client.time()
    now_ms, window_ms = int(seconds) * 1000 + int(micros) // 1000, settings.dedupe_window_ms
    names = [dedupe_buckets(keys, window_ms, now_ms) for keys in places]
    answers = yield pipelined(lambda pipe: [pipe.hget(name, request_id) for buckets in names for name in buckets])
    found, at = [], 0
    for buckets in names:
        newest = next((value for value in answers[at:at + len(buckets)] if value is not None), None)
        at += len(buckets)
        settled_at, _, packed = text(newest or "0").partition(RESERVATION_SEP)
        counts = newest is not None and settled_at.isdigit() and int(settled_at) + window_ms > now_ms
        if counts and (record := _checked(request_id, packed)):
            found.append(record)
    return found


def _checked(request_id: str, packed: bytes | str) -> Recorded | None:
    """None for a value the library did not write (a settling call refuses it too)."""
    try:
        return recorded(request_id, packed)
    except ValueError:
        return None


def _number(value: str) -> int | None:
    return int(value) if value else None
