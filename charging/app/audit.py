"""An independent check of the money, read from Redis alone (not through the worker's code):
every request has exactly one outcome, no stream entry settled twice, per account
sum(charged) == start - end (charges and commits; reserving, extending and releasing charge
nothing), no balance below zero, the held funds of every account equal to what its open
reservations hold, no available funds (balance - held) below zero, no commit that charged
more than its reservation held, nothing left pending; given the credit lots granted, per
lot granted == spent + breakage + left and per account the breakage events == the wallet's
breakage; and every bad entry in the dead-letter stream, once, with a reason. Used by the
bench, the chaos run, the demo and tests."""

from __future__ import annotations

import re

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import redis

from charging import codec
from charging.app.accounts import stored_balances
from charging.keys import all_partitions, partition_of
from charging.settings import Settings

PAGE = 10_000
PINS = ("reserve", "extend")  # their draws pin funds in lots; a commit's draws are what it took


def entry_key(partition: int, entry_id: str) -> str:
    """A stream entry across partitions: entry ids are unique only within one stream."""
    return f"p{partition}:{entry_id}"


@dataclass
class Audit:
    outcomes: int = 0
    approved: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    missing: list[str] = field(default_factory=list)  # expected, no outcome
    repeated: list[str] = field(default_factory=list)  # more than one first (non-duplicate) outcome
    resettled: list[str] = field(default_factory=list)  # entry_key()s with more than one outcome
    replay_mismatches: list[str] = field(default_factory=list)  # a replay not answered with the stored outcome
    conflicts: set[str] = field(default_factory=set)  # request ids answered idempotency_conflict
    money: dict[str, tuple[int, int]] = field(default_factory=dict)  # account -> (approved sum, balance drop)
    negative: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, str] = field(default_factory=dict)  # account -> a stored balance the library did not write
    pending: int = 0
    deadletters: int = 0
    held: int = 0  # total held by open reservations
    open_reservations: int = 0
    held_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)  # account -> (held, sum of open)
    negative_available: dict[str, int] = field(default_factory=dict)  # account -> balance - held
    overcommitted: list[str] = field(default_factory=list)  # commits that charged more than was reserved
    lots: int = 0  # credit lots checked (those granted)
    lot_draws: int = 0  # first approved outcomes that took from a lot other than main
    breakage_events: int = 0
    # (account, lot) -> (granted, spent, breakage, left) where granted != the sum of the rest
    lot_mismatch: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    # (account, money or a service) -> (breakage events' sum, the wallet's breakage total)
    breakage_mismatch: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.repeated or self.resettled or self.replay_mismatches or self.money
                    or self.negative or self.corrupt or self.pending or self.held_mismatch or self.negative_available
                    or self.overcommitted or self.lot_mismatch or self.breakage_mismatch)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "outcomes": self.outcomes, "approved": self.approved, "rejected": dict(self.rejected),
            "duplicates": self.duplicates, "idempotency_conflicts": len(self.conflicts),
            "missing": len(self.missing), "double_charged": len(self.repeated),
            "entries_settled_twice": len(self.resettled), "replay_mismatches": len(self.replay_mismatches),
            "money_mismatches": len(self.money), "negative_balances": len(self.negative),
            "corrupt_balances": len(self.corrupt),
            "pending": self.pending, "deadletters": self.deadletters, "held": self.held,
            "open_reservations": self.open_reservations, "held_mismatches": len(self.held_mismatch),
            "negative_available": len(self.negative_available), "overcommitted": len(self.overcommitted),
            **(self._lots_dict() if self.lots else {}),
        }

    def _lots_dict(self) -> dict:
        """Only when lots were checked: the other modes and runs grant none."""
        return {"lots": self.lots, "lot_draws": self.lot_draws, "breakage_events": self.breakage_events,
                "lot_mismatches": len(self.lot_mismatch), "breakage_mismatches": len(self.breakage_mismatch)}


def read_outcomes(client: redis.Redis, settings: Settings) -> Iterator[dict[str, str]]:
    for keys in all_partitions(settings.namespace, settings.partitions):
        start = "-"
        while page := client.xrange(keys.results, start, "+", count=PAGE):
            for _, fields in page:
                yield {k.decode(): v.decode() for k, v in fields.items()}
            start = "(" + page[-1][0].decode()


def audit(client: redis.Redis, settings: Settings, start_balances: Mapping[str, int],
          expected: Iterable[str] | None = None, granted: Mapping[tuple[str, str], int] | None = None) -> Audit:
    """start_balances: every account's main balance before the load (accounts not named are
    not checked for money). expected: request ids that must each have exactly one outcome.
    granted: (account, lot) -> the quantity granted, for every credit lot the load started
    with (given, the lots and every account's breakage are checked)."""
    report = Audit()
    charged = _tally(report, read_outcomes(client, settings), settings.partitions)
    if expected is not None:
        firsts = set(charged.firsts)
        report.missing = [rid for rid in expected if rid not in firsts]
    balances, report.corrupt = stored_balances(client, settings)
    # A raw write that still reads as a whole number (negative, above the limit) counts in the money too.
    balances.update((a, int(v)) for a, v in report.corrupt.items() if re.fullmatch(r"-?[0-9]+", v))
    report.negative = {a: b for a, b in balances.items() if b < 0}
    for account, start in start_balances.items():
        drop = start - balances.get(account, start)
        if drop != charged.by_account.get(account, 0):
            report.money[account] = (charged.by_account.get(account, 0), drop)
    _check_holds(client, settings, balances, report)
    if granted is not None:
        _check_lots(client, settings, granted, charged, report)
    for keys in all_partitions(settings.namespace, settings.partitions):
        report.deadletters += client.xlen(keys.deadletter)
        try:
            report.pending += client.xpending(keys.requests, settings.group)["pending"]
        except redis.ResponseError:  # no group yet: nothing was ever read
            pass
    return report


@dataclass
class _Charged:
    by_account: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # what approved charges took of main balances
    firsts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # request id -> its first outcome
    from_lots: Counter = field(default_factory=Counter)  # (account, lot) -> what approved outcomes took of it
    broken_lots: Counter = field(default_factory=Counter)  # (account, lot) -> its breakage events' sum
    broken: Counter = field(default_factory=Counter)  # (account, money or a service) -> breakage events' sum


def _tally(report: Audit, outcomes: Iterable[dict[str, str]], partitions: int) -> _Charged:
    charged = _Charged()
    firsts: Counter = Counter()
    per_entry: Counter = Counter()
    replays: list[tuple[str, tuple[str, ...]]] = []
    for outcome in outcomes:
        if outcome.get("op") == "expire":  # a lot's breakage (docs/plans-and-lots.md): no request's outcome
            report.breakage_events += 1
            _count_breakage(outcome, charged)
            continue
        report.outcomes += 1
        if outcome["entry_id"]:  # '' for authorize, which has no stream entry
            # The worker settles an entry only in its account's partition (else wrong_partition).
            per_entry[entry_key(partition_of(outcome["account"], partitions), outcome["entry_id"])] += 1
        answer = (outcome["status"], outcome["reason"], outcome["charged"], outcome["balance"])
        if outcome["duplicate"] == "1":
            report.duplicates += 1
            if outcome["reason"] == "idempotency_conflict":
                report.conflicts.add(outcome["request_id"])
            else:
                replays.append((outcome["request_id"], answer))
            continue
        firsts[outcome["request_id"]] += 1
        charged.firsts.setdefault(outcome["request_id"], answer)
        if outcome["status"] == "approved":
            report.approved += 1
            charged.by_account[outcome["account"]] += main_taken(outcome)
            if outcome.get("draws") and outcome.get("op") not in PINS:
                report.lot_draws += 1
                for lot, qty, _ in codec.parse_draws(outcome["draws"]):
                    if lot != "main":
                        charged.from_lots[outcome["account"], lot] += qty
            if outcome.get("op") == "commit" and int(outcome["charged"]) > int(outcome["reserved"]):
                report.overcommitted.append(outcome["request_id"])
        else:
            report.rejected[outcome["reason"]] += 1
    report.repeated = [rid for rid, n in firsts.items() if n > 1]
    # A stalled worker that woke up after its entry was reclaimed and settled would show here.
    report.resettled = [key for key, n in per_entry.items() if n > 1]
    # A replay (same content) answers with the stored outcome, a stored rejection included.
    report.replay_mismatches = [rid for rid, answer in replays if charged.firsts.get(rid) != answer]
    return charged


def main_taken(outcome: Mapping[str, str]) -> int:
    """What an approved outcome took from the main balance: all it charged, unless credit
    lots gave part of it (its draws say; a reserve's or an extend's draws are what it pins)."""
    if not outcome.get("draws") or outcome["charged"] == "0":
        return int(outcome["charged"])
    return sum(qty for lot, qty, unit in codec.parse_draws(outcome["draws"]) if lot == "main" and not unit)


def _count_breakage(event: Mapping[str, str], charged: _Charged) -> None:
    """A breakage event, by lot and by the measure the wallet totals it in."""
    qty = int(event["breakage"])
    charged.broken_lots[event["account"], event["lot"]] += qty
    charged.broken[event["account"], "money" if event["kind"] == "money" else event["service"]] += qty


def _check_lots(client: redis.Redis, settings: Settings, granted: Mapping[tuple[str, str], int],
                charged: _Charged, report: Audit) -> None:
    """Per lot granted: granted == spent (first outcomes' draws) + breakage (its events) +
    left (the wallet; 0 once the lot has gone). Per account: the breakage events summed by
    measure == the wallet's breakage totals."""
    left: dict[tuple[str, str], int] = {}
    totals: Counter = Counter()
    for keys in all_partitions(settings.namespace, settings.partitions):
        for account, packed in client.hscan_iter(keys.wallets, count=1000):
            name, held = account.decode(), codec.wallet(packed)
            left.update(((name, lot.id), lot.left) for lot in held.lots)
            totals[name, "money"] += held.breakage
            totals.update({(name, service): units for service, units in held.breakage_units.items()})
    report.lots = len(granted)
    for key, quantity in granted.items():
        parts = (charged.from_lots[key], charged.broken_lots[key], left.get(key, 0))
        if quantity != sum(parts):
            report.lot_mismatch[key] = (quantity, *parts)
    for key in (charged.broken.keys() | totals.keys()):
        if charged.broken[key] != totals[key]:
            report.breakage_mismatch[key] = (charged.broken[key], totals[key])


def _check_holds(client: redis.Redis, settings: Settings, balances: Mapping[str, int], report: Audit) -> None:
    """Per account: the held total against the sum of its open reservations, and balance - held >= 0."""
    held: Counter = Counter()
    reserved: Counter = Counter()
    for keys in all_partitions(settings.namespace, settings.partitions):
        for account, value in client.hscan_iter(keys.held, count=1000):
            held[account.decode()] += int(value)
        for _, packed in client.hscan_iter(keys.reservations, count=1000):
            record = codec.reservation(packed)
            reserved[record.account] += record.main
            report.open_reservations += 1
    report.held = sum(held.values())
    report.held_mismatch = {a: (held[a], reserved[a]) for a in held.keys() | reserved.keys() if held[a] != reserved[a]}
    report.negative_available = {a: balances.get(a, 0) - h for a, h in held.items()
                                 if balances.get(a, 0) - h < 0}


@dataclass
class DeadLetterAudit:
    expected: int = 0
    found: int = 0  # expected entries dead-lettered once, with a reason
    missing: list[str] = field(default_factory=list)  # expected entry_key()s not dead-lettered
    wrong_reason: dict[str, tuple[str, str]] = field(default_factory=dict)  # entry_key() -> (expected, got)
    repeated: list[str] = field(default_factory=list)  # dead-lettered more than once
    good: list[str] = field(default_factory=list)  # request ids of good requests found dead-lettered
    others: int = 0  # dead letters nobody listed (e.g. a bad entry XADDed twice by a retry)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong_reason or self.repeated or self.good)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "expected": self.expected, "found": self.found, "missing": len(self.missing),
                "wrong_reason": len(self.wrong_reason), "repeated": len(self.repeated),
                "good_requests_dead_lettered": len(self.good), "others": self.others}


def read_deadletters(client: redis.Redis, settings: Settings) -> Iterator[tuple[int, dict[bytes, bytes]]]:
    """(partition, fields) of every dead letter."""
    for keys in all_partitions(settings.namespace, settings.partitions):
        start = "-"
        while page := client.xrange(keys.deadletter, start, "+", count=PAGE):
            for _, fields in page:
                yield keys.partition, fields
            start = "(" + page[-1][0].decode()


def audit_deadletters(client: redis.Redis, settings: Settings, expected: Mapping[str, str],
                      good: Iterable[str] = ()) -> DeadLetterAudit:
    """expected: entry_key() -> the reason the entry must be dead-lettered with. good: request
    ids that must never be dead-lettered (requests that were valid when submitted)."""
    report = DeadLetterAudit(expected=len(expected))
    reasons: dict[str, list[str]] = defaultdict(list)
    good_ids = set(good)
    for partition, fields in read_deadletters(client, settings):
        key = entry_key(partition, fields[b"entry_id"].decode())
        reason = fields.get(b"error", b"").decode() if fields.get(b"detail") else ""  # a reason has both
        reasons[key].append(reason)
        request_id = fields.get(b"request_id", b"").decode("utf-8", "replace")
        if key not in expected and request_id in good_ids:
            report.good.append(request_id)
    report.others = sum(len(r) for key, r in reasons.items() if key not in expected)
    for key, reason in expected.items():
        got = reasons.get(key)
        if not got:
            report.missing.append(key)
        elif len(got) > 1:
            report.repeated.append(key)
        elif got[0] != reason:
            report.wrong_reason[key] = (reason, got[0])
        else:
            report.found += 1
    return report
