"""Stateful property tests: random sequences of operations drive the real functions of
lua/charging.lua on a real Redis, next to the reference model in tests/model.py, and after
every step the money rules are checked:

- no balance and no held total below zero;
- held = what the open holds not yet expired hold, and the stored held total of an account
  = what its stored reservations hold; available = balance - held;
- money is conserved: start + top-ups - charged = balance, per account; and per account and
  measure (money, units of each service), granted in lots = spent + breakage + left;
- the lots are the model's (plans, lots, the spend order, expiry, breakage, what
  reservations pin); no lot below zero or pinned above what it has left;
- every answer is the model's, and a replay returns the stored outcome field for field;
- every call answered posts exactly one outcome, and a refused call writes nothing;
- through a worker killed with SIGKILL between steps: every acked entry has exactly one
  outcome or dead letter, and no request is charged twice.

The model's clock is the processed_at each answer carries; holds and dedupe records live for
milliseconds, so expiry happens within a sequence without sleeping a whole second.
CHARGING_MODEL_EXAMPLES=N runs N sequences (CI: 200 of 30 steps, about a minute).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from charging import codec
from charging.connection import connect
from charging.keys import Keys
from charging.plan import run
from charging.schema import ChargeRequest, Outcome, parse_request
from charging.settings import Settings
from charging.streams import ensure_group
from charging.tariff import price, unit_price
from tests.model import Answer, Ledger, Lot, Request
from tests.records import recorded
from worker.loop import Worker

EXAMPLES = int(os.environ.get("CHARGING_MODEL_EXAMPLES", "200"))
STEPS = 30
WORKER_EXAMPLES = max(25, EXAMPLES // 8)
WORKER_STEPS = 10

ACCOUNTS = ("alice", "bob", "carol")
CROWD = tuple(f"crowd{i}" for i in range(40))  # a busy partition: many holds of other accounts
REQUEST_IDS = ("r0", "r1", "r2", "r3")  # reused ids, besides fresh ones: replays and conflicts
MALFORMED = ("1e3", "0x10", " 5", "5 ", "-5", "0", "1.5", "inf", "abc", "9" * 17)
# (argument, value) pairs no settling call may accept, whatever its operation.
BAD_ARGUMENTS = ([("window_ms", v) for v in (*MALFORMED, "")] + [("reply_ttl_ms", v) for v in (*MALFORMED, "")]
                 + [("amount", v) for v in MALFORMED] + [("ttl_ms", v) for v in MALFORMED]
                 + [("units", v) for v in MALFORMED] + [("submitted_at", v) for v in ("abc", "-5", "1.5", "1e3")]
                 + [("request_id", v) for v in ("has space", "r" * 129)] + [("account", "a b")])
MAX_BALANCE = 10**15
LAST_ID = "18446744073709551615-18446744073709551615"

_namespaces = itertools.count()

prices = st.one_of(st.builds(lambda a: {"amount": a}, st.integers(1, 200)),
                   st.builds(lambda s, u: {"service": s, "units": u}, st.sampled_from(("sms", "voice", "data")),
                             st.integers(1, 20)))
usages = st.one_of(st.builds(lambda a: {"amount": a}, st.integers(1, 150)),
                   st.builds(lambda u: {"units": u}, st.integers(1, 30)))
# A hold of 1 ms is past its expiry at every later call (each call starts on a later server
# millisecond than the answer before), one of 60 s at none: expiry is a function of the
# sequence, not of the machine's speed, so a failure replays and shrinks.
ttls = st.sampled_from((1, 60_000))
request_ids = st.one_of(st.none(), st.sampled_from(REQUEST_IDS))  # None: a fresh id
SERVICES = ("sms", "voice", "data")
PLANS = ("gold", "silver")
LOT_IDS = ("bundle", "promo", "scoped", "extra")  # reused: idempotent grants and conflicts
plan_prices = st.fixed_dictionaries({s: st.integers(1, 9) for s in SERVICES})
# A lot: money of any service or of one, or units of one; for good, for 1 ms (expired at every
# later call, like a hold), for half a minute or a minute (so that a later grant can expire
# first), or until a moment common to all lots (equal expiries). Expiry stays a function of
# the sequence, not of the machine's speed, so that a failure replays and shrinks.
lots = st.one_of(st.builds(lambda q: ("money", q, ""), st.integers(1, 300)),  # the spend order's edge cases are
                 st.builds(lambda q: ("money", q, ""), st.integers(1, 300)),  # among these: twice as likely
                 st.builds(lambda q, s: ("money", q, s), st.integers(1, 300), st.sampled_from(SERVICES)),
                 st.builds(lambda q, s: ("units", q, s), st.integers(1, 40), st.sampled_from(SERVICES)))
lot_expiries = st.sampled_from((None, ("in", 1), ("in", 30_000), ("in", 60_000), ("at", "common")))


def dedupe_buckets(client: redis.Redis, keys: Keys) -> list[str]:
    """Every dedupe bucket of the partition, by name."""
    return sorted(name.decode() for name in client.scan_iter(match=keys.dedupe("*", "*"), count=1000))


@contextmanager
def at_last_id(client: redis.Redis, stream: str) -> Iterator[None]:
    """stream at the last possible id while the block runs (XADD * refused), then put back."""
    saved = client.dump(stream)
    client.xadd(stream, {"forged": "1"}, id=LAST_ID)
    try:
        yield
    finally:
        client.delete(stream)
        if saved is not None:
            client.restore(stream, 0, saved)


def profile(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def answer_of(reply: codec.Settled) -> Answer:
    return Answer(reply.status, reply.reason, reply.charged, reply.balance, reply.duplicate, reply.held,
                  reply.reserved, reply.expires_at, reply.draws)


def main_taken(charged: int, draws: str) -> int:
    """What an approved answer took from the main balance (lots' draws aside)."""
    if not draws or not charged:
        return charged
    return sum(qty for lot, qty, unit in codec.parse_draws(draws) if lot == "main" and not unit)


class LedgerMachine(RuleBasedStateMachine):
    """Synchronous calls, one at a time, checked against the model after every step."""

    reservations = Bundle("reservations")

    def __init__(self, client: redis.Redis, url: str):
        super().__init__()
        self.client = client
        self.settings = Settings(redis_url=url, namespace=f"model{os.getpid()}x{next(_namespaces)}")
        self.keys = Keys(self.settings.namespace, 0)
        self.ledger = Ledger()
        self.clock = 0  # the latest server time an answer or the sweep reported
        self.window_ms = 60_000
        self.history: list[tuple[dict, int | None]] = []
        self.request_ids: set[str] = set()
        self.fresh = itertools.count()
        self.start: dict[str, int] = {}
        self.topped_up: Counter = Counter()
        self.charged: Counter = Counter()
        self.taken_reply = self.keys.reply("taken")  # a reply stream name someone made a string
        self.reply = self.keys.reply("model")
        self.common = self.server_ms() + 45_000  # an expiry lots may share

    def teardown(self):
        names = [*codec.partition_keys(self.keys), self.keys.deadletter, self.keys.deadletter_reasons,
                 self.taken_reply, self.reply, *dedupe_buckets(self.client, self.keys)]
        for start in range(0, len(names), 500):
            self.client.delete(*names[start:start + 500])

    # ---- the calls ----------------------------------------------------------------------

    def settle(self, data: dict, ttl_ms: int | None = None, swapped: str | None = None) -> ChargeRequest:
        """One settling call through the codec, checked against the model and the results
        stream. swapped: a key of the partition another client has made a string for this
        call; it is put back before the answer is checked."""
        if data["request_id"] is None:
            data = {**data, "request_id": f"f{next(self.fresh)}"}
        request = parse_request(data, self.settings)
        price(request, self.settings)  # the maximum charge, judged on the default plan
        amount = request.amount  # units of a charge or reserve: priced by the account's plan, in the library
        given = {"window_ms": self.window_ms} | ({} if ttl_ms is None else {"ttl_ms": ttl_ms})
        self.wait_past_clock()
        self.history.append((data, ttl_ms))
        self.request_ids.add(request.request_id)
        posted = self.client.xlen(self.keys.results)
        with self.swapped(swapped):
            reply = codec.settled(codec.settle(self.client, self.settings, request, amount, given=given))
        seen = answer_of(reply)
        expected = self.ledger.settle(self.model_request(request, amount, ttl_ms), reply.processed_at, seen)
        assert seen == expected, f"{request.op} {data}: library {seen}, model {expected}"
        self.clock = max(self.clock, reply.processed_at)
        added = self.client.xrange(self.keys.results, f"({self.last_result(posted)}", "+") if posted else \
            self.client.xrange(self.keys.results)
        outcome, *events = [fields for _, fields in added]
        assert Outcome.from_fields(outcome) == codec.outcome(request, reply)
        self.breakage_events_are_the_models(events, request.account, self.ledger.broken)
        if reply.status == "approved" and not reply.duplicate:
            self.charged[request.account] += main_taken(reply.charged, reply.draws)
        return request

    def last_result(self, count: int) -> str:
        """The id of the count-th entry of the results stream (the last before a call)."""
        [(entry_id, _)] = self.client.xrange(self.keys.results, "-", "+", count=count)[-1:]
        return entry_id.decode()

    def breakage_events_are_the_models(self, events: list, account: str, broken: dict[str, int]) -> None:
        posted = {}
        for fields in events:
            event = Outcome.from_fields(fields)
            assert (event.op, event.status, event.account) == ("expire", "expired", account), event
            posted[event.lot] = event.breakage
        assert posted == broken, f"breakage events {posted}, model {broken}"

    def wait_past_clock(self) -> None:
        """Every call starts on a server millisecond after the last answer: a 1 ms hold or lot
        is past its expiry at every later call."""
        while self.server_ms() <= self.clock:
            time.sleep(0.0002)

    @contextmanager
    def swapped(self, name: str | None) -> Iterator[None]:
        """name made a string while the block runs, then put back as it was; a call refused
        for it (WRONGTYPE) must have written nothing, and the refusal goes on up."""
        if name is None:
            yield
            return
        saved, before, records = self.client.dump(name), self.dumps(skip=name), self.records(skip=name)
        self.client.delete(name)
        self.client.set(name, "not ours")
        try:
            yield
        except redis.ResponseError as refusal:
            assert "WRONGTYPE" in str(refusal), refusal
            assert self.dumps(skip=name) == before, f"a call refused for {name} of another type wrote"
            assert self.records(skip=name) <= records
            raise
        finally:
            self.client.delete(name)
            if saved is not None:
                self.client.restore(name, 0, saved)

    def dumps(self, skip: str) -> list:
        """Every key of the partition but skip, serialized whatever its type (DUMP)."""
        pipe = self.client.pipeline(transaction=False)
        for name in (*codec.partition_keys(self.keys), self.taken_reply):
            if name != skip:
                pipe.dump(name)
        return pipe.execute()

    def model_request(self, request, amount: int | None, ttl_ms: int | None) -> Request:
        reserve = request.op == "reserve"
        if ttl_ms is None and request.ttl is not None:
            ttl_ms = request.ttl * 1000
        if reserve and ttl_ms is None:
            ttl_ms = self.settings.reservation_ttl_s * 1000
        rated = request.op in ("charge", "reserve") and request.service is not None
        return Request(request.op, request.request_id, request.account, request.fingerprint, self.window_ms,
                       amount=amount, units=request.units if amount is None else None,
                       unit_price=unit_price(request, self.settings) if reserve else 1,
                       reservation=request.reservation_id, ttl_ms=ttl_ms,
                       service=request.service if rated else None,
                       default_price=self.settings.tariff[request.service] if rated else 1)

    def refused(self, call, reason: str, request_id: str | None = None) -> None:
        """call must fail with reason and change nothing."""
        before, records = self.snapshot(), self.records()
        with pytest.raises(redis.ResponseError) as refusal:
            call()
        # Writes first: a call that wrote and then failed is the worse defect, whatever it said.
        assert self.snapshot() == before, f"a refused call wrote: {refusal.value}"
        # Dedupe buckets of millisecond windows expire as the test runs: none may have gained a record.
        assert self.records() <= records, f"a refused call recorded an outcome: {refusal.value}"
        assert refusal.match(reason)
        if request_id is not None:
            assert recorded(self.client, self.settings, request_id) == []

    def snapshot(self) -> list:
        pipe = self.client.pipeline(transaction=False)
        for name in (self.keys.balances, self.keys.held, self.keys.reservations, self.keys.wallets, self.keys.plans):
            pipe.hgetall(name)
        for name in (self.keys.expiries, self.keys.holds, self.keys.lot_expiries):
            pipe.zrange(name, 0, -1, withscores=True)
        pipe.xrange(self.keys.results)
        pipe.get(self.taken_reply)
        return pipe.execute()

    def records(self, skip: str | None = None) -> set[tuple[str, bytes, bytes]]:
        """Every record of every dedupe bucket but skip: (bucket, request id, record)."""
        pipe = self.client.pipeline(transaction=False)
        names = [name for name in dedupe_buckets(self.client, self.keys) if name != skip]
        for name in names:
            pipe.hgetall(name)
        return {(name, rid, packed) for name, fields in zip(names, pipe.execute()) for rid, packed in fields.items()}

    # ---- rules ----------------------------------------------------------------------------

    @initialize(balances=st.lists(st.integers(0, 1000), min_size=len(ACCOUNTS), max_size=len(ACCOUNTS)),
                window_ms=st.one_of(st.just(60_000), st.integers(10, 200)))
    def open_accounts(self, balances, window_ms):
        self.window_ms = window_ms
        opening = dict(zip(ACCOUNTS, balances)) | dict.fromkeys(CROWD, 1000)
        codec.set_balances(self.client, self.settings, opening.items())
        self.client.set(self.taken_reply, "not a stream")
        self.ledger.balances.update(opening)
        self.start.update(opening)

    @initialize(granted=st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(LOT_IDS), lots, lot_expiries),
                                 min_size=2, max_size=8),
                plans=st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(PLANS), plan_prices), max_size=2))
    def open_wallets(self, granted, plans):
        """Most sequences start with lots and plans, so that charges meet them."""
        for account, plan, prices in plans:
            self.set_plan(plan, prices)
            self.assign_plan(account, plan)
        for account, lot_id, lot, expiry in granted:
            self.grant(account, lot_id, lot, expiry)

    @rule(account=st.sampled_from((*ACCOUNTS, "nobody")), cost=prices, request_id=request_ids)
    def charge(self, account, cost, request_id):
        self.settle({"request_id": request_id, "account": account, **cost})

    @rule(target=reservations, account=st.sampled_from((*ACCOUNTS, "nobody")), cost=prices,
          request_id=request_ids, ttl_ms=ttls)
    def reserve(self, account, cost, request_id, ttl_ms):
        request = self.settle({"op": "reserve", "request_id": request_id, "account": account, **cost}, ttl_ms)
        return request.reservation_id

    @rule(reservation=reservations, usage=usages, request_id=request_ids,
          ttl_ms=st.one_of(st.none(), ttls))
    def extend(self, reservation, usage, request_id, ttl_ms):
        self.settle({"op": "extend", "request_id": request_id, "reservation": reservation, **usage}, ttl_ms)

    @rule(reservation=reservations, usage=usages, request_id=request_ids)
    def commit(self, reservation, usage, request_id):
        self.settle({"op": "commit", "request_id": request_id, "reservation": reservation, **usage})

    @rule(reservation=reservations, request_id=request_ids)
    def release(self, reservation, request_id):
        self.settle({"op": "release", "request_id": request_id, "reservation": reservation})

    @rule(account=st.sampled_from(ACCOUNTS), cost=prices)
    def charge_an_account(self, account, cost):
        """More charges on accounts that exist, most of which hold lots (open_wallets)."""
        self.charge(account, cost, None)

    @rule(target=reservations, account=st.sampled_from(ACCOUNTS), cost=prices, ttl_ms=ttls)
    def reserve_an_account(self, account, cost, ttl_ms):
        return self.reserve(account, cost, None, ttl_ms)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def replay(self, data):
        """A request sent again, the same in every field (a producer's retry)."""
        self.settle(*data.draw(st.sampled_from(self.history), label="replayed"))

    @rule(count=st.sampled_from((1, 5, 20, 40)), together=st.booleans())
    def busy_partition(self, count, together):
        """Other accounts of the partition hold funds: for a minute, or until a common deadline
        just after this step, so that many holds are past their expiry at once."""
        deadline = self.clock + 2 * count + 20
        made = [self.settle({"op": "reserve", "request_id": f"crowd-{next(self.fresh)}", "account": account,
                             "amount": 10}, max(1, deadline - self.clock - 1) if together else 60_000)
                for account in CROWD[:count]]
        if together:
            last = max((self.ledger.holds[r.reservation_id].expires_at for r in made
                        if r.reservation_id in self.ledger.holds), default=0)
            while self.server_ms() <= last:
                time.sleep(0.0005)

    @rule(ms=st.integers(0, 40))
    def wait(self, ms):
        time.sleep(ms / 1000)

    @rule(limit=st.integers(1, 5))
    def sweep(self, limit):
        """The sweep takes the first limit ids due of each index (reservations, lots) and ends
        every expired reservation and lot of their accounts."""
        self.wait_past_clock()
        now = self.server_ms()
        due = [*self.client.zrange(self.keys.expiries, "-inf", now, byscore=True, offset=0, num=limit),
               *self.client.zrange(self.keys.lot_expiries, "-inf", now, byscore=True, offset=0, num=limit)]
        accounts = list(dict.fromkeys(rid.decode().split("/")[0] for rid in due))
        before = self.stored_reservations()
        posted = self.client.xlen(self.keys.results)
        released = codec.expire_reservations(self.client, self.settings.model_copy(update={"sweep_batch": limit}),
                                             self.keys)
        now = self.server_ms()
        gone = before.keys() - self.stored_reservations().keys()
        assert all(before[rid].expires_at <= now for rid in gone), "the sweep released a hold not yet expired"
        assert released == len(gone)
        added = self.client.xrange(self.keys.results, f"({self.last_result(posted)}", "+") if posted else \
            self.client.xrange(self.keys.results)
        events = [fields for _, fields in added]
        ended = set()
        for account in accounts:
            holds, broken = self.ledger.sweep(account, now)
            ended |= holds.keys()
            mine = [f for f in events if f[b"account"].decode() == account]
            self.breakage_events_are_the_models(mine, account, broken)
        assert gone == ended
        assert len(events) == sum(f[b"account"].decode() in accounts for f in events)
        self.clock = max(self.clock, now)

    @rule(account=st.sampled_from((*ACCOUNTS, "nobody")), lot_id=st.sampled_from(LOT_IDS), lot=lots,
          expiry=lot_expiries)
    def grant(self, account, lot_id, lot, expiry):
        kind, quantity, service = lot
        self.wait_past_clock()
        before = self.server_ms()
        posted = self.client.xlen(self.keys.results)
        ttl = expiry[1] if expiry and expiry[0] == "in" else None
        at = self.common if expiry and expiry[0] == "at" else None
        try:
            granted = codec.grant(self.client, self.settings, account, lot_id, kind, quantity, service or None,
                                  expires_at=at, expires_in_ms=ttl)
            seen, expires_at = granted.status, granted.expires_at
        except redis.ResponseError as refusal:
            seen, expires_at = str(refusal).split(":")[0], None
        now = self.server_ms()
        if seen == "granted":
            assert expires_at == at if at is not None else (expires_at is None) == (ttl is None)
            assert ttl is None or before <= expires_at - ttl <= now
        spec = f"in:{ttl}" if ttl is not None else f"at:{at}" if at is not None else ""
        made = Lot(lot_id, kind, service, quantity, quantity, 0, expires_at, spec, 0)
        expected = self.ledger.grant(account, made, now)
        assert seen == expected, f"grant {account} {lot_id} {lot} {expiry}: library {seen}, model {expected}"
        events = self.client.xrange(self.keys.results, f"({self.last_result(posted)}", "+") if posted else \
            self.client.xrange(self.keys.results)
        self.breakage_events_are_the_models([f for _, f in events], account,
                                            self.ledger.broken if seen in ("granted", "duplicate") else {})
        self.clock = max(self.clock, now)

    @rule(account=st.sampled_from(ACCOUNTS), kind=st.sampled_from(("money", "units", "gift")),
          quantity=st.sampled_from((*MALFORMED, "")), service=st.sampled_from(("", "sms", "fax")),
          expiry=st.sampled_from((("", ""), ("1", ""), ("", "0"), ("", "1e3"), ("1", "1"))))
    def malformed_grant(self, account, kind, quantity, service, expiry):
        """A grant no caller may make: refused, nothing written."""
        names = [self.keys.balances, self.keys.wallets, self.keys.lot_expiries, self.keys.results]
        self.refused(lambda: self.client.fcall("grant", len(names), *names, account, "bad", kind, quantity, service,
                                               *expiry),
                     "invalid_|unknown_service|missing_service")

    @rule(account=st.sampled_from((*ACCOUNTS, "nobody")), lot_id=st.sampled_from(LOT_IDS), lot=lots,
          expiry=st.sampled_from((None, ("in", 30), ("in", 60), ("at", "common"))), request_id=request_ids)
    def grant_through_the_stream(self, account, lot_id, lot, expiry, request_id):
        """A grant entry settled by pump, as a worker would, checked against the model."""
        kind, quantity, service = lot
        request_id = request_id or f"f{next(self.fresh)}"
        fields = {"op": "grant", "request_id": request_id, "account": account, "lot": lot_id,
                  **({"units": quantity, "service": service} if kind == "units" else
                     {"amount": quantity} | ({"service": service} if service else {}))}
        if expiry:
            fields["expires_in" if expiry[0] == "in" else "expires_at"] = expiry[1] if expiry[0] == "in" else self.common
        request = parse_request(fields, self.settings)
        self.wait_past_clock()
        run(self.client, ensure_group(self.keys.requests, self.settings.group))
        posted = self.client.xlen(self.keys.results)
        self.client.xadd(self.keys.requests, request.to_fields())
        names, header = codec.entries_keys(self.keys), codec.entries_header(self.settings, self.keys)
        header[1] = self.window_ms  # the sequence's dedupe window, in ms as the library takes it
        done = codec.summary(self.client.fcall("pump", len(names), *names, "model", 1, 0, "", *header))
        assert (done.read, done.refused) == (1, 0), done
        added = self.client.xrange(self.keys.results, f"({self.last_result(posted)}", "+") if posted else \
            self.client.xrange(self.keys.results)
        outcome, *events = [Outcome.from_fields(fields) for _, fields in added]
        spec = f"in:{expiry[1] * 1000}" if expiry and expiry[0] == "in" else f"at:{self.common}" if expiry else ""
        made = Lot(lot_id, kind, service, quantity, quantity, 0, self.common if expiry and expiry[0] == "at" else None,
                   spec, 0)
        model = Request("grant", request_id, account, request.fingerprint, self.window_ms, lot=made,
                        expires_in_ms=expiry[1] * 1000 if expiry and expiry[0] == "in" else None)
        seen = Answer(outcome.status, outcome.reason, outcome.charged, outcome.balance, outcome.duplicate,
                      reserved=outcome.granted, expires_at=outcome.expires_at)
        expected = self.ledger.settle(model, outcome.processed_at, seen)
        assert seen == replace(expected, held=None), f"grant {fields}: library {seen}, model {expected}"
        assert len(events) == len(self.ledger.broken)
        self.clock = max(self.clock, outcome.processed_at)

    @rule(plan=st.sampled_from(PLANS), prices=plan_prices)
    def set_plan(self, plan, prices):
        assert codec.set_plan(self.client, self.keys, plan, prices) == (0 if plan in self.ledger.plans else 1)
        self.ledger.plans[plan] = prices

    @rule(account=st.sampled_from((*ACCOUNTS, "nobody")), plan=st.sampled_from((*PLANS, "default")))
    def assign_plan(self, account, plan):
        assigning = lambda: codec.assign_plan(self.client, self.settings, account, plan)  # noqa: E731
        if account not in self.ledger.balances:
            self.refused(assigning, "unknown_account")
        elif plan != "default" and plan not in self.ledger.plans:
            self.refused(assigning, "unknown_plan")
        else:
            assert assigning() == plan
            if plan == "default":
                self.ledger.plan_of.pop(account, None)
            else:
                self.ledger.plan_of[account] = plan

    @rule(account=st.sampled_from((*ACCOUNTS, "nobody")),
          amount=st.one_of(st.integers(1, 500), st.just(MAX_BALANCE), st.sampled_from(MALFORMED)))
    def top_up(self, account, amount):
        balance = self.ledger.balances.get(account)
        top_up = lambda: codec.top_up(self.client, self.settings, account, amount)  # noqa: E731
        if isinstance(amount, str):
            self.refused(top_up, "invalid_amount")
        elif balance is None:
            self.refused(top_up, "unknown_account")
        elif balance + self.ledger.lot_money(account) + amount > MAX_BALANCE:
            self.refused(top_up, "balance_too_large")
        else:
            assert top_up() == balance + amount
            self.ledger.balances[account] = balance + amount
            self.topped_up[account] += amount

    @rule(account=st.sampled_from(ACCOUNTS),
          balance=st.one_of(st.integers(0, 500), st.sampled_from((*MALFORMED, "-77", "9" * 20, "", "0100", "00"))))
    def set_balance(self, account, balance):
        set_balance = lambda: codec.set_balances(self.client, self.settings, [(account, balance)])  # noqa: E731
        if isinstance(balance, str) and not (balance.isdigit() and balance.isascii() and int(balance) <= MAX_BALANCE):
            self.refused(set_balance, "invalid_balance|balance_too_large")
            return
        if int(balance) + self.ledger.lot_money(account) > MAX_BALANCE:
            self.refused(set_balance, "balance_too_large")
            return
        assert set_balance() == 1
        self.ledger.balances[account] = self.start[account] = int(balance)
        self.topped_up[account] = self.charged[account] = 0

    @rule(op=st.sampled_from(("charge", "reserve", "extend", "commit", "release")), account=st.sampled_from(ACCOUNTS),
          bad=st.sampled_from(BAD_ARGUMENTS))
    def malformed_call(self, op, account, bad):
        """A direct FCALL with one argument no caller may pass: refused, nothing written."""
        request_id = f"bad-{next(self.fresh)}"
        data = {"op": op, "request_id": request_id}
        data |= {"account": account, "amount": 5} if op in ("charge", "reserve") else {"reservation": f"{account}/r0"}
        data |= {"amount": 5} if op in ("extend", "commit") else {}
        request = parse_request(data, self.settings)
        given = {"window_ms": self.window_ms} | dict([bad])
        self.refused(lambda: codec.settle(self.client, self.settings, request, price(request, self.settings),
                                          given=given),
                     "invalid_|field_not_allowed", request_id)

    @rule(account=st.sampled_from(ACCOUNTS), cost=prices)
    def reply_to_another_type(self, account, cost):
        request_id = f"taken-{next(self.fresh)}"
        request = parse_request({"request_id": request_id, "account": account, "reply_to": self.taken_reply, **cost},
                                self.settings)
        self.refused(lambda: codec.settle(self.client, self.settings, request, price(request, self.settings)),
                     "WRONGTYPE", request_id)

    @rule(role=st.sampled_from(("results", "held", "reservations", "expiries", "holds", "dedupe")),
          op=st.sampled_from(("charge", "reserve")), account=st.sampled_from(ACCOUNTS), cost=prices)
    def key_of_another_type(self, role, op, account, cost):
        """One of the partition's keys (dedupe: the bucket of now) made a string by another
        client for one call: the call is refused before it writes, or, if it needs nothing of
        that key, answered as the model says."""
        data = {"op": op, "request_id": f"typed-{next(self.fresh)}", "account": account, **cost}
        if role == "dedupe":
            slice_ms = codec.dedupe_slice(self.window_ms)
            name = self.keys.dedupe(slice_ms, self.server_ms() // slice_ms)
        else:
            name = getattr(self.keys, role)
        try:
            self.settle(data, None if op == "charge" else 60_000, swapped=name)
        except redis.ResponseError:
            pass  # refused, and checked to have written nothing

    @rule(stream=st.sampled_from(("results", "reply")), op=st.sampled_from(("charge", "reserve")),
          account=st.sampled_from(ACCOUNTS), cost=prices)
    def stream_at_last_id(self, stream, op, account, cost):
        """A stream the call posts to at the last possible id for one call (any role allowed
        to XADD there can put it there): refused before it writes, whatever the model says."""
        request_id = f"last-{next(self.fresh)}"
        data = {"op": op, "request_id": request_id, "account": account, "reply_to": self.reply, **cost}
        request = parse_request(data, self.settings)
        with at_last_id(self.client, self.keys.results if stream == "results" else self.reply):
            self.refused(lambda: codec.settle(self.client, self.settings, request, price(request, self.settings),
                                              given={"window_ms": self.window_ms}),
                         "stream_exhausted", request_id)

    @rule()
    def pump_header_joined_alike(self):
        """Found by review: pump keeps each checked context keyed by its tag and header joined
        with the library's separator; a crafted tag made another call's parts join to the
        same text, and that call (whose group is invalid) ran on the kept context. Refused,
        whatever the model says."""
        header = [str(v) for v in codec.entries_header(self.settings, self.keys)]
        crafted_tag = f"{self.keys.tag}\x1fx:{{p0}}"
        crafted = [crafted_tag + name[len(self.keys.tag):] for name in codec.entries_keys(self.keys)]
        with pytest.raises(redis.ResponseError):  # checked and kept; then no group there
            self.client.fcall("pump", len(crafted), *crafted, "model", 1, 0, "", *header)
        names = codec.entries_keys(self.keys)
        joined_alike = ["x:{p0}", *header[:13], f"{header[13]}\x1f{header[14]}"]
        self.refused(lambda: self.client.fcall("pump", len(names), *names, "model", 1, 0, "", *joined_alike),
                     "invalid_group")

    # ---- after every step -------------------------------------------------------------------

    def stored_reservations(self) -> dict[str, codec.Reservation]:
        return {rid.decode(): codec.reservation(packed)
                for rid, packed in self.client.hgetall(self.keys.reservations).items()}

    def server_ms(self) -> int:
        seconds, micros = self.client.time()
        return seconds * 1000 + micros // 1000

    @invariant()
    def money_rules_hold(self):
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.balances)
        pipe.hgetall(self.keys.held)
        pipe.zrange(self.keys.expiries, 0, -1, withscores=True)
        pipe.zrange(self.keys.holds, 0, -1)
        raw_balances, raw_held, expiries, index = pipe.execute()
        stored = self.stored_reservations()
        balances = {a.decode(): v.decode() for a, v in raw_balances.items()}
        held = {a.decode(): v.decode() for a, v in raw_held.items()}
        assert all(v.isdigit() for v in (*balances.values(), *held.values())), (balances, held)  # never below 0
        assert {a: int(v) for a, v in balances.items()} == self.ledger.balances
        expired = [f[b"request_id"] for _, f in self.client.xrange(self.keys.results) if f.get(b"op") == b"expire"]
        assert len(expired) == len(set(expired)), "two breakage events with one request id"
        for account, start in self.start.items():
            assert int(balances[account]) == start + self.topped_up[account] - self.charged[account], account
        # The stored held total is what the stored reservations hold, and they are all indexed.
        holding: Counter = Counter()
        for reservation in stored.values():
            holding[reservation.account] += reservation.main
        assert {a: int(v) for a, v in held.items()} == {a: n for a, n in holding.items() if n}
        assert {rid.decode(): int(at) for rid, at in expiries} == {rid: r.expires_at for rid, r in stored.items()}
        assert {rid.decode() for rid in index} == stored.keys()
        # held = what the holds not yet expired hold: the same holds as the model's.
        unexpired = {rid: (r.account, r.amount, r.expires_at, r.unit_price, r.ttl_ms, r.service, r.draws)
                     for rid, r in stored.items() if r.expires_at > self.clock}
        assert unexpired == {rid: (h.account, h.amount, h.expires_at, h.unit_price, h.ttl_ms, h.service, h.draws)
                             for rid, h in self.ledger.open_holds(self.clock).items()}
        self.lots_are_the_models(stored)

    def lots_are_the_models(self, stored: dict[str, codec.Reservation]) -> None:
        """The wallets against the model, which records a lot's expiry when the library
        does: at a call on its account, or the sweep of it. Every lot's held part is what the
        stored reservations pin of it, and its expiry is indexed."""
        wallets = {a.decode(): codec.wallet(w) for a, w in self.client.hgetall(self.keys.wallets).items()}
        plans = {p.decode(): v.decode() for p, v in self.client.hgetall(self.keys.plans).items()}
        assert plans == {p: "\x1f".join(str(prices[s]) for s in SERVICES) for p, prices in self.ledger.plans.items()}
        indexed = {m.decode(): int(at) for m, at in self.client.zrange(self.keys.lot_expiries, 0, -1, withscores=True)}
        pins: Counter = Counter()
        for r in stored.values():
            for lot_id, qty, _ in r.draws:
                if lot_id != "main":
                    pins[r.account, lot_id] += qty
        for account in {*wallets, *self.ledger.lots, *self.ledger.plan_of}:
            wallet = wallets.get(account, codec.Wallet())
            assert wallet.plan == self.ledger.plan_of.get(account, ""), account
            stored_lots = {lot.id: lot for lot in wallet.lots}
            model_lots = {lot.id: lot for lot in self.ledger.lots.get(account, [])}
            for lot in stored_lots.values():
                assert 0 <= lot.held <= lot.left <= lot.granted, (account, lot)
                assert lot.held == pins[account, lot.id], (account, lot, pins[account, lot.id])
                if lot.expires_at is not None:
                    assert indexed.get(f"{account}/{lot.id}", lot.expires_at) == lot.expires_at, (account, lot)
            shown = lambda lots: {i: (x.kind, x.service, x.granted, x.left, x.held, x.expires_at, x.spec)  # noqa: E731
                                  for i, x in lots.items()}
            assert shown(stored_lots) == shown(model_lots), account
            breakage = Counter({"money": wallet.breakage, **wallet.breakage_units})
            assert +breakage == +Counter({m: n for (a, m), n in self.ledger.breakage.items() if a == account})
            # granted = spent + breakage + left, per measure
            left: Counter = Counter()
            for lot in wallet.lots:
                left[lot.service if lot.kind == "units" else "money"] += lot.left
            for measure in ("money", *SERVICES):
                granted = self.ledger.granted[account, measure]
                broken = wallet.breakage if measure == "money" else wallet.breakage_units.get(measure, 0)
                assert granted == self.ledger.spent[account, measure] + broken + left[measure], (account, measure)


@pytest.mark.slow
def test_every_money_rule_holds_after_every_step_of_random_sequences(redis_url):
    client = connect(Settings(redis_url=redis_url, namespace="model"))
    run_state_machine_as_test(lambda: LedgerMachine(client, redis_url), settings=profile(EXAMPLES, STEPS))


# ---- pump through a worker killed between steps -------------------------------------------

CONSUMER = "model-worker"  # one stable name: a restarted worker settles its own pending entries first
WORKER_ACCOUNTS = ("alice", "bob")
WORKER_REQUEST_IDS = tuple(f"w{i}" for i in range(6))
DRAIN_TIMEOUT_S = 60


def entry(kind: str, request_id: str, account: str, amount: int) -> tuple[list[str], str | None]:
    """An entry as raw field/value pairs (XADD takes a name twice), and the dead-letter
    reason it must get (None: a good charge)."""
    good = ["request_id", request_id, "account", account, "amount", str(amount)]
    return {
        "good": (good, None),
        "duplicate_field": (good + ["amount", "777"], "duplicate_field"),
        "too_many_fields": (good + ["request_id", request_id] * 14, "too_many_fields"),
        "invalid_amount": (good[:-1] + [f"{amount}e3"], "invalid_amount"),
    }[kind]


entries = st.builds(entry, st.sampled_from(("good",) * 5 + ("duplicate_field", "too_many_fields", "invalid_amount")),
                    st.sampled_from(WORKER_REQUEST_IDS), st.sampled_from(WORKER_ACCOUNTS), st.integers(1, 60))


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return int(ms), int(seq)


def start_worker(settings: Settings) -> int:
    """A burst worker in a process of its own (forked: no interpreter start-up), to be killed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = Worker(connect(settings), settings, CONSUMER, burst=True).run()
        finally:
            os._exit(code)
    return pid


class WorkerMachine(RuleBasedStateMachine):
    """Entries XADDed raw (good charges, replays, conflicts and bad entries) and settled by
    worker processes that are SIGKILLed at random moments, or left to drain."""

    def __init__(self, client: redis.Redis, url: str):
        super().__init__()
        self.client = client
        # Two entries per read, so that a kill usually finds a batch in hand; kills must not
        # dead-letter a good entry for its deliveries.
        self.settings = Settings(redis_url=url, namespace=f"model{os.getpid()}x{next(_namespaces)}",
                                 reclaim_idle_ms=500, maintenance_interval_s=0.2, block_ms=100, batch=2,
                                 max_deliveries=1000)
        self.keys = Keys(self.settings.namespace, 0)
        self.entries: list[tuple[str, list[str], str | None]] = []  # entry id, pairs, dead-letter reason
        self.start: dict[str, int] = {}

    def teardown(self):
        names = [*codec.partition_keys(self.keys), self.keys.deadletter, self.keys.deadletter_reasons,
                 *dedupe_buckets(self.client, self.keys)]
        self.client.delete(*names)

    @initialize(balances=st.lists(st.integers(0, 300), min_size=len(WORKER_ACCOUNTS), max_size=len(WORKER_ACCOUNTS)))
    def open_accounts(self, balances):
        self.start = dict(zip(WORKER_ACCOUNTS, balances))
        codec.set_balances(self.client, self.settings, self.start.items())
        run(self.client, ensure_group(self.keys.requests, self.settings.group))

    @rule(batch=st.lists(entries, min_size=1, max_size=20))
    def submit(self, batch):
        for pairs, reason in batch:
            entry_id = self.client.execute_command("XADD", self.keys.requests, "*", *pairs).decode()
            self.entries.append((entry_id, pairs, reason))

    def settled(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.keys.results)
        pipe.xlen(self.keys.deadletter)
        return sum(pipe.execute())

    @rule(share=st.integers(0, 100))
    def worker_killed(self, share):
        """SIGKILL once the worker has settled share % of the entries left (or 2 s passed).
        No precondition: what is left depends on when earlier kills landed, and hypothesis
        needs the rules it may choose to be the same when it replays a sequence."""
        settled = self.settled()
        if settled >= len(self.entries):
            return
        goal, deadline = settled + (len(self.entries) - settled) * share // 100, time.monotonic() + 2
        pid = start_worker(self.settings)
        while self.settled() < goal and time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return  # drained before the goal: nothing to kill
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    @rule(stream=st.sampled_from(("results", "deadletter")), ms=st.integers(50, 400))
    def stream_at_last_id(self, stream, ms):
        """A worker runs for a while with the results or the dead-letter stream at the last
        possible id: what it cannot post stays pending, and nothing is acked without it. While
        its calls are refused it pauses the partition and reads no more of it than one call
        holds (found by review: its wait read the pausing partition, pulling every unread
        entry into its pending list one per wait, each counting a delivery nobody tried)."""
        if self.settled() >= len(self.entries):
            return
        before = self.client.xpending(self.keys.requests, self.settings.group)["pending"]
        with at_last_id(self.client, getattr(self.keys, stream)):
            pid = start_worker(self.settings)
            time.sleep(ms / 1000)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        grown = self.client.xpending(self.keys.requests, self.settings.group)["pending"] - before
        assert grown <= self.settings.batch + 1, f"a refused worker took {grown} entries into its pending list"

    @rule()
    def drain(self):
        """A worker left to finish: then every entry has its outcome, the model's, in stream order."""
        pid = start_worker(self.settings)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the burst worker did not drain"
        assert self.client.xpending(self.keys.requests, self.settings.group)["pending"] == 0
        self.outcomes_are_the_models()

    def outcomes_are_the_models(self):
        """One worker consumer settles entries in stream order (its own pending ones first after
        a restart, and they are the oldest), so the model replays them in that order."""
        ledger = Ledger()
        ledger.balances.update(self.start)
        outcomes = {f[b"entry_id"].decode(): Outcome.from_fields(f) for _, f in self.client.xrange(self.keys.results)}
        for entry_id, pairs, reason in self.entries:
            if reason is not None:
                continue
            request = parse_request(list(zip(pairs[::2], pairs[1::2])), self.settings)
            done = outcomes[entry_id]
            seen = Answer(done.status, done.reason, done.charged, done.balance, done.duplicate)
            expected = ledger.settle(Request("charge", request.request_id, request.account, request.fingerprint,
                                             self.settings.dedupe_window_ms, amount=request.amount),
                                     done.processed_at, seen)
            assert seen == expected, f"entry {entry_id} {pairs}: worker {seen}, model {expected}"

    @invariant()
    def every_acked_entry_has_exactly_one_outcome_or_dead_letter(self):
        # One snapshot (MULTI): a pump call a killed worker wrote to its socket just before the
        # kill may still run between two separate reads, and would look acked without outcome.
        pipe = self.client.pipeline(transaction=True)
        pipe.xrange(self.keys.results)
        pipe.xrange(self.keys.deadletter)
        pipe.xpending_range(self.keys.requests, self.settings.group, "-", "+", count=10_000)
        pipe.xinfo_groups(self.keys.requests)
        pipe.hgetall(self.keys.balances)
        stored, dead_letters, pending_entries, [group], raw_balances = pipe.execute()
        results = [f for _, f in stored]
        dead = {f[b"entry_id"].decode(): f[b"error"].decode() for _, f in dead_letters}
        settled = Counter(f[b"entry_id"].decode() for f in results)
        settled.update(dead.keys())
        pending = {p["message_id"].decode() for p in pending_entries}
        delivered = stream_id(group["last-delivered-id"])
        for entry_id, pairs, reason in self.entries:
            acked = stream_id(entry_id) <= delivered and entry_id not in pending
            assert settled[entry_id] == (1 if acked else 0), (entry_id, pairs, acked, settled[entry_id])
            if acked:
                assert dead.get(entry_id) == reason, (entry_id, pairs, dead.get(entry_id))
        # Charged once: one first outcome per request id, and replays answer with it.
        firsts = {}
        for f in results:
            if f[b"duplicate"] == b"0":
                assert f[b"request_id"] not in firsts, f"request {f[b'request_id']} settled twice"
                firsts[f[b"request_id"]] = f
        for f in results:
            if f[b"duplicate"] == b"1" and f[b"reason"] != b"idempotency_conflict":
                first = firsts[f[b"request_id"]]
                assert [f[k] for k in (b"status", b"reason", b"charged", b"balance")] == [
                    first[k] for k in (b"status", b"reason", b"charged", b"balance")]
        # No overdraft, and the money adds up: start - charged = balance.
        balances = {a.decode(): int(v) for a, v in raw_balances.items()}
        charged = Counter()
        for f in firsts.values():
            if f[b"status"] == b"approved":
                charged[f[b"account"].decode()] += int(f[b"charged"])
        assert balances == {a: start - charged[a] for a, start in self.start.items()}
        assert all(b >= 0 for b in balances.values())


@pytest.mark.slow
def test_a_worker_killed_between_steps_settles_every_entry_once(redis_url):
    client = connect(Settings(redis_url=redis_url, namespace="model"))
    run_state_machine_as_test(lambda: WorkerMachine(client, redis_url), settings=profile(WORKER_EXAMPLES, WORKER_STEPS))
