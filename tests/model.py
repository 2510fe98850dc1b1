"""A reference model of the ledger in plain Python: what lua/charging.lua must answer.

Accounts with balances, holds (reservations) with their expiry, and dedupe records with the
outcome they stored. It is meant to be small enough to be obviously right; tests/test_model.py
runs it next to the real functions and compares every answer and the money after every step.

Time is the server's: each answer's processed_at is the ``now`` the model decides at. Where
the rules leave the library a choice, the model takes the answer the library gave
(``seen``) if it is one of the allowed ones:

- a hold past its expiry is released by whichever call comes first (the account's next
  call, or the sweep), so a commit, extend or release naming it answers
  ``reservation_expired`` if it was still there, else ``unknown_reservation``;
- a dedupe record expires by Redis's key clock, which is read when a call starts, while
  processed_at is read a little later (more so on a loaded machine): from EARLY_MS before
  the first answer's processed_at + the window to LATE_MS after it, either answer is
  allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

EARLY_MS, LATE_MS = 5, 50
SESSION_OPS = ("reserve", "extend", "commit", "release")


@dataclass(frozen=True)
class Hold:
    account: str
    amount: int
    expires_at: int
    unit_price: int
    ttl_ms: int


@dataclass(frozen=True)
class Request:
    """A settling call as the library sees it. amount: what a charge or reserve is worth, or
    the amount of a commit or extend (None when it counts units)."""

    op: str
    request_id: str
    account: str
    fingerprint: str
    window_ms: int
    amount: int | None = None
    units: int | None = None
    unit_price: int = 1
    reservation: str | None = None
    ttl_ms: int | None = None


@dataclass(frozen=True)
class Answer:
    """The outcome of a settling call; held, reserved and expires_at for the reservation
    operations only (None for a charge, and expires_at when there is no reservation)."""

    status: str
    reason: str
    charged: int
    balance: int
    duplicate: bool = False
    held: int | None = None
    reserved: int | None = None
    expires_at: int | None = None


@dataclass(frozen=True)
class Record:
    fingerprint: str
    answer: Answer
    expires_at: int


class Ledger:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.holds: dict[str, Hold] = {}  # open reservations by id, expired ones until something ends them
        self.records: dict[str, Record] = {}

    def held(self, account: str, now: int) -> int:
        """What the account's holds not yet expired hold: all that a decision may count."""
        return sum(h.amount for h in self.holds.values() if h.account == account and h.expires_at > now)

    def open_holds(self, now: int) -> dict[str, Hold]:
        return {rid: h for rid, h in self.holds.items() if h.expires_at > now}

    def forget(self, reservation_ids) -> None:
        """Holds the sweep released (each past its expiry). The model may have ended one
        already: it ends an account's expired holds at each of the account's calls, where
        the library may leave one for the sweep (a refused or replayed call writes nothing)."""
        for rid in reservation_ids:
            self.holds.pop(rid, None)

    def settle(self, r: Request, now: int, seen: Answer) -> Answer:
        """The answer to r at now, with its effect on the ledger."""
        ended = {rid: h for rid, h in self.holds.items() if h.account == r.account and h.expires_at <= now}
        for rid in ended:
            del self.holds[rid]
        record = self._record(r.request_id, now, seen)
        if record is not None:
            if record.fingerprint != r.fingerprint:
                return self._answer(r, "rejected", "idempotency_conflict", 0, now, duplicate=True, reserved=0)
            return replace(record.answer, duplicate=True)
        answer = getattr(self, f"_{r.op}")(r, now, ended, seen)
        self.records[r.request_id] = Record(r.fingerprint, answer, now + r.window_ms)
        return answer

    def _record(self, request_id: str, now: int, seen: Answer) -> Record | None:
        record = self.records.get(request_id)
        if record is None or now < record.expires_at - EARLY_MS:
            return record
        if now > record.expires_at + LATE_MS or not seen.duplicate:
            del self.records[request_id]
            return None
        return record

    def _answer(self, r: Request, status: str, reason: str, charged: int, now: int, duplicate: bool = False,
                reserved: int = 0, expires_at: int | None = None) -> Answer:
        """An answer with the account's balance and held total as they are now."""
        answer = Answer(status, reason, charged, self.balances.get(r.account, 0), duplicate)
        if r.op not in SESSION_OPS:
            return answer
        return replace(answer, held=self.held(r.account, now), reserved=reserved, expires_at=expires_at)

    def _charge(self, r: Request, now: int, ended, seen) -> Answer:
        balance = self.balances.get(r.account)
        if balance is None:
            return self._answer(r, "rejected", "unknown_account", 0, now)
        if balance - self.held(r.account, now) < r.amount:
            return self._answer(r, "rejected", "insufficient_funds", 0, now)
        self.balances[r.account] = balance - r.amount
        return self._answer(r, "approved", "", r.amount, now)

    def _reserve(self, r: Request, now: int, ended, seen) -> Answer:
        balance = self.balances.get(r.account)
        if balance is None:
            return self._answer(r, "rejected", "unknown_account", 0, now)
        if (open_ := self.holds.get(r.reservation)) is not None:
            return self._answer(r, "rejected", "reservation_exists", 0, now, reserved=open_.amount,
                                expires_at=open_.expires_at)
        if balance - self.held(r.account, now) < r.amount:
            return self._answer(r, "rejected", "insufficient_funds", 0, now)
        hold = Hold(r.account, r.amount, now + r.ttl_ms, r.unit_price, r.ttl_ms)
        self.holds[r.reservation] = hold
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at)

    def _named(self, r: Request, now: int, ended: dict[str, Hold], seen: Answer) -> tuple[Hold | None, Answer | None]:
        """The open hold a commit, extend or release acts on, or the rejection."""
        if (hold := self.holds.get(r.reservation)) is not None:
            return hold, None
        unknown = self._answer(r, "rejected", "unknown_reservation", 0, now)
        if (gone := ended.get(r.reservation)) is None:
            return None, unknown
        expired = self._answer(r, "rejected", "reservation_expired", 0, now, reserved=gone.amount,
                               expires_at=gone.expires_at)
        return None, unknown if seen == unknown else expired

    def _worth(self, r: Request, hold: Hold) -> int:
        return r.amount if r.amount is not None else r.units * hold.unit_price

    def _commit(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        used, balance, was = self._worth(r, hold), self.balances.get(r.account), (hold.amount, hold.expires_at)
        if used > hold.amount:
            return self._answer(r, "rejected", "exceeds_reservation", 0, now, reserved=was[0], expires_at=was[1])
        if balance is None or balance < used:
            return self._answer(r, "rejected", "insufficient_funds", 0, now, reserved=was[0], expires_at=was[1])
        self.balances[r.account] = balance - used
        del self.holds[r.reservation]
        return self._answer(r, "approved", "", used, now, reserved=was[0], expires_at=was[1])

    def _extend(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        more, balance = self._worth(r, hold), self.balances.get(r.account)
        if balance is None or balance - self.held(r.account, now) < more:
            return self._answer(r, "rejected", "insufficient_funds", 0, now, reserved=hold.amount,
                                expires_at=hold.expires_at)
        hold = replace(hold, amount=hold.amount + more, expires_at=now + (r.ttl_ms or hold.ttl_ms))
        self.holds[r.reservation] = hold
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at)

    def _release(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        del self.holds[r.reservation]
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at)
