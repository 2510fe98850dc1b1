"""A reference model of the ledger in plain Python: what lua/charging.lua must answer.

Accounts with balances, plans and credit lots (docs/plans-and-lots.md), holds
(reservations) with their expiry and what they pin of each lot, and dedupe records with the
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

from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field, replace

EARLY_MS, LATE_MS = 5, 50
MAX_BALANCE = 10**15  # an account's money, its lots' included, stays within the library's limit
SESSION_OPS = ("reserve", "extend", "commit", "release")
NEVER = float("inf")

Draw = tuple[str, int, bool]  # a lot's id ('main': the main balance), the quantity, whether in units


@dataclass
class Lot:
    id: str
    kind: str  # money or units
    service: str  # '' for money of any service
    granted: int
    left: int  # what is left of it, held included
    held: int  # what open (or expired, not yet released) holds pin of it
    expires_at: int | None
    spec: str  # the expiry as granted: what a replayed grant must match
    order: int  # granted before a lot of a higher order

    def live(self, now: int) -> bool:
        return self.expires_at is None or self.expires_at > now

    @property
    def measure(self) -> str:
        return self.service if self.kind == "units" else "money"


@dataclass(frozen=True)
class Hold:
    account: str
    amount: int
    expires_at: int
    unit_price: int
    ttl_ms: int
    service: str = ""
    draws: tuple[Draw, ...] = ()

    @property
    def main(self) -> int:
        return sum(qty for lot, qty, _ in self.draws if lot == "main")


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
    unit_price: int = 1  # a reserve's (a commit or extend in units uses its reservation's)
    reservation: str | None = None
    ttl_ms: int | None = None
    service: str | None = None  # units of a charge or reserve: priced by the account's plan
    default_price: int = 1  # the default plan's price of service (the tariff)
    lot: Lot | None = None  # what a grant grants (its expiry: expires_in_ms, or its own)
    expires_in_ms: int | None = None


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
    draws: str = ""  # what each lot gave ('' when only the main balance did, and for a replay)


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
        self.plans: dict[str, dict[str, int]] = {}
        self.plan_of: dict[str, str] = {}
        self.lots: dict[str, list[Lot]] = {}  # by account, in the order granted; expired ones until recorded
        self.breakage: Counter = Counter()  # (account, measure) -> breakage recorded
        self.granted: Counter = Counter()  # (account, measure) -> granted in lots
        self.spent: Counter = Counter()  # (account, measure) -> taken from lots by charges and commits
        self.orders = 0
        self.broken: dict[str, int] = {}  # the breakage the last call recorded, by lot

    def held(self, account: str, now: int) -> int:
        """What the account's holds not yet expired hold of its main balance: all a decision may count."""
        return sum(h.main for h in self.holds.values() if h.account == account and h.expires_at > now)

    def open_holds(self, now: int) -> dict[str, Hold]:
        return {rid: h for rid, h in self.holds.items() if h.expires_at > now}

    def lot(self, account: str, lot_id: str) -> Lot | None:
        return next((lot for lot in self.lots.get(account, []) if lot.id == lot_id), None)

    def lot_money(self, account: str) -> int:
        return sum(lot.left for lot in self.lots.get(account, []) if lot.kind == "money")

    def money(self, account: str) -> tuple[int, int]:
        """The account's money (main balance and money lots, held included) and what is held of it."""
        lots = [lot for lot in self.lots.get(account, []) if lot.kind == "money"]
        main_held = sum(h.main for h in self.holds.values() if h.account == account)
        return (self.balances.get(account, 0) + sum(lot.left for lot in lots),
                main_held + sum(lot.held for lot in lots))

    # ---- lots -----------------------------------------------------------------------------

    def grant(self, account: str, lot: Lot, now: int, call: bool = True) -> str:
        """granted, duplicate or the refusal: idempotency_conflict, too_many_lots,
        unknown_account. The account's lots that have expired go first (call: the function
        grant, whose breakage this is; else a grant a settling call makes, which ended them)."""
        if account not in self.balances:
            return "unknown_account"
        # The account's expired lots go first (their breakage recorded), unless the grant is refused.
        before = deepcopy((self.lots.get(account, []), self.breakage))
        ended = self.end_lots(account, now)
        if call:
            self.broken = ended
        refusal = None
        if (known := self.lot(account, lot.id)) is not None:
            same = (known.kind, known.service, known.granted, known.spec) == (lot.kind, lot.service, lot.granted,
                                                                             lot.spec)
            refusal = None if same else "idempotency_conflict"
        elif len(self.lots.get(account, [])) >= 32:
            refusal = "too_many_lots"
        elif lot.kind == "money" and self.balances[account] + self.lot_money(account) + lot.granted > MAX_BALANCE:
            refusal = "balance_too_large"
        if refusal:
            self.lots[account], self.breakage = before
            if call:
                self.broken = {}
            return refusal
        if known is not None:
            return "duplicate"
        self.orders += 1
        self.lots.setdefault(account, []).append(replace(lot, order=self.orders))
        self.granted[account, lot.measure] += lot.granted
        return "granted"

    def end_lots(self, account: str, now: int) -> dict[str, int]:
        """Breakage: what is left unpinned in each lot that has expired; a lot with nothing
        left goes. Returns the breakage recorded now, by lot."""
        broken: dict[str, int] = {}
        kept = []
        for lot in self.lots.get(account, []):
            if not lot.live(now) and lot.left > lot.held:
                broken[lot.id] = lot.left - lot.held
                self.breakage[account, lot.measure] += lot.left - lot.held
                lot.left = lot.held
            if lot.live(now) or lot.left > 0:
                kept.append(lot)
        self.lots[account] = kept
        return broken

    def end_holds(self, account: str, now: int) -> dict[str, Hold]:
        """The account's holds past their expiry end: what they pinned goes back."""
        ended = {rid: h for rid, h in self.holds.items() if h.account == account and h.expires_at <= now}
        for rid, hold in ended.items():
            del self.holds[rid]
            self.unpin(account, hold)
        return ended

    def unpin(self, account: str, hold: Hold) -> None:
        for lot_id, qty, _ in hold.draws:
            if lot_id != "main":
                self.lot(account, lot_id).held -= qty

    def sweep(self, account: str, now: int) -> tuple[dict[str, Hold], dict[str, int]]:
        """The sweep ended the account's expired holds and lots, as its next call would."""
        return self.end_holds(account, now), self.end_lots(account, now)

    def draws(self, account: str, service: str | None, units: int | None, price: int, amount: int | None,
              now: int) -> tuple[list[Draw], int] | None:
        """The spend order: unit lots of service, then money lots of service, then money lots
        of any service (earliest expiry first, then the order granted: those that never expire
        last), then the main balance. The draws and the money among them; None when short."""
        def first(lots):
            return sorted(lots, key=lambda lot: (NEVER if lot.expires_at is None else lot.expires_at, lot.order))

        lots = [lot for lot in self.lots.get(account, []) if lot.live(now)]
        taken: list[Draw] = []
        need = amount or 0
        if units is not None:
            left = units
            for lot in first(x for x in lots if x.kind == "units" and x.service == service):
                if (take := min(left, lot.left - lot.held)) > 0:
                    taken.append((lot.id, take, True))
                    left -= take
            need = left * price
        money = need
        sources = first(x for x in lots if x.kind == "money" and service and x.service == service)
        sources += first(x for x in lots if x.kind == "money" and not x.service)
        for lot in sources:
            if need and (take := min(need, lot.left - lot.held)) > 0:
                taken.append((lot.id, take, False))
                need -= take
        if need:
            if account not in self.balances or self.balances[account] - self.held(account, now) < need:
                return None
            taken.append(("main", need, False))
        return taken, money

    def take(self, account: str, taken: list[Draw]) -> None:
        for lot_id, qty, _ in taken:
            if lot_id == "main":
                self.balances[account] -= qty
            else:
                lot = self.lot(account, lot_id)
                lot.left -= qty
                self.spent[account, lot.measure] += qty

    def pin(self, account: str, draws: list[Draw]) -> None:
        for lot_id, qty, _ in draws:
            if lot_id != "main":
                self.lot(account, lot_id).held += qty

    # ---- settling ------------------------------------------------------------------------

    def settle(self, r: Request, now: int, seen: Answer) -> Answer:
        """The answer to r at now, with its effect on the ledger."""
        ended = self.end_holds(r.account, now)
        self.broken = self.end_lots(r.account, now)
        record = self._record(r.request_id, now, seen)
        if record is not None:
            if record.fingerprint != r.fingerprint:
                return self._answer(r, "rejected", "idempotency_conflict", 0, now, duplicate=True, reserved=0)
            return replace(record.answer, duplicate=True)
        if r.op in ("charge", "reserve") and r.units is not None:
            plan = self.plan_of.get(r.account)
            r = replace(r, unit_price=self.plans[plan][r.service] if plan else r.default_price)
        answer = getattr(self, f"_{r.op}")(r, now, ended, seen)
        self.broken.update({k: v + self.broken.get(k, 0) for k, v in self.end_lots(r.account, now).items()})
        self.records[r.request_id] = Record(r.fingerprint, replace(answer, draws=""), now + r.window_ms)
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
                reserved: int = 0, expires_at: int | None = None, draws: list[Draw] | None = None) -> Answer:
        """An answer with the account's money and held total as they are now."""
        balance, held = self.money(r.account)
        shown = ",".join(f"{lot}:{qty}{'u' if unit else ''}" for lot, qty, unit in draws or ())
        answer = Answer(status, reason, charged, balance, duplicate,
                        draws=shown if any(lot != "main" for lot, _, _ in draws or ()) else "")
        if r.op == "grant":  # reserved: what it granted
            return replace(answer, reserved=reserved, expires_at=expires_at)
        if r.op not in SESSION_OPS:
            return answer
        return replace(answer, held=held, reserved=reserved, expires_at=expires_at)

    def _charge(self, r: Request, now: int, ended, seen) -> Answer:
        if r.account not in self.balances:
            return self._answer(r, "rejected", "unknown_account", 0, now)
        planned = self.draws(r.account, r.service, r.units, r.unit_price, r.amount, now)
        if planned is None:
            return self._answer(r, "rejected", "insufficient_funds", 0, now)
        taken, money = planned
        self.take(r.account, taken)
        return self._answer(r, "approved", "", money, now, draws=taken)

    def _reserve(self, r: Request, now: int, ended, seen) -> Answer:
        if r.account not in self.balances:
            return self._answer(r, "rejected", "unknown_account", 0, now)
        if (open_ := self.holds.get(r.reservation)) is not None:
            return self._answer(r, "rejected", "reservation_exists", 0, now, reserved=open_.amount,
                                expires_at=open_.expires_at)
        planned = self.draws(r.account, r.service, r.units, r.unit_price, r.amount, now)
        if planned is None:
            return self._answer(r, "rejected", "insufficient_funds", 0, now)
        pinned, _ = planned
        self.pin(r.account, pinned)
        amount = r.amount if r.units is None else r.units * r.unit_price
        hold = Hold(r.account, amount, now + r.ttl_ms, r.unit_price, r.ttl_ms, r.service or "", merged((), pinned))
        self.holds[r.reservation] = hold
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at,
                            draws=pinned)

    def _named(self, r: Request, now: int, ended: dict[str, Hold], seen: Answer) -> tuple[Hold | None, Answer | None]:
        """The open hold a commit, extend or release acts on, or the rejection."""
        if (hold := self.holds.get(r.reservation)) is not None:
            return hold, None
        unknown = self._answer(r, "rejected", "unknown_reservation", 0, now)
        if (gone := ended.get(r.reservation)) is None:
            return None, unknown
        expired = self._answer(r, "rejected", "reservation_expired", 0, now, reserved=gone.amount,
                               expires_at=gone.expires_at)
        return None, unknown if replace(seen, draws="") == unknown else expired

    def _commit(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        was = (hold.amount, hold.expires_at)
        # Units from the units it pinned first, then money at its unit price; an amount from its money.
        gives, left = [], r.units or 0
        for lot_id, qty, unit in hold.draws:
            give = min(qty, left) if unit else 0
            left -= give
            gives.append(give)
        need = r.amount if r.amount is not None else left * hold.unit_price
        money = need
        for main in (False, True):  # the money of lots before the main balance's, as a charge spends
            for i, (lot_id, qty, unit) in enumerate(hold.draws):
                if not unit and (lot_id == "main") == main:
                    gives[i] = min(qty, need)
                    need -= gives[i]
        if need:
            return self._answer(r, "rejected", "exceeds_reservation", 0, now, reserved=was[0], expires_at=was[1])
        main = sum(g for (lot_id, _, _), g in zip(hold.draws, gives) if lot_id == "main")
        if self.balances.get(r.account, 0) < main:
            return self._answer(r, "rejected", "insufficient_funds", 0, now, reserved=was[0], expires_at=was[1])
        del self.holds[r.reservation]
        self.unpin(r.account, hold)
        taken = [(lot_id, g, unit) for (lot_id, _, unit), g in zip(hold.draws, gives) if g]
        self.take(r.account, taken)
        return self._answer(r, "approved", "", money, now, reserved=was[0], expires_at=was[1], draws=taken)

    def _extend(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        planned = self.draws(r.account, hold.service or None, r.units, hold.unit_price, r.amount, now)
        if planned is None:
            return self._answer(r, "rejected", "insufficient_funds", 0, now, reserved=hold.amount,
                                expires_at=hold.expires_at)
        pinned, _ = planned
        self.pin(r.account, pinned)
        more = r.amount if r.amount is not None else r.units * hold.unit_price
        hold = replace(hold, amount=hold.amount + more, expires_at=now + (r.ttl_ms or hold.ttl_ms),
                       draws=merged(hold.draws, pinned))
        self.holds[r.reservation] = hold
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at,
                            draws=pinned)

    def _grant(self, r: Request, now: int, ended, seen) -> Answer:
        """A grant through the stream: approved with what it granted now (0: the lot was there,
        the same), or rejected; reserved: what was granted, expires_at: the lot's."""
        lot = r.lot
        if r.expires_in_ms is not None:
            lot = replace(lot, expires_at=now + r.expires_in_ms)
        result = self.grant(r.account, lot, now, call=False)
        balance, _ = self.money(r.account)
        if result not in ("granted", "duplicate"):
            return Answer("rejected", result, 0, balance, reserved=0, expires_at=None)
        held = self.lot(r.account, lot.id)
        return Answer("approved", "", 0, balance, reserved=lot.granted if result == "granted" else 0,
                      expires_at=held.expires_at)

    def _release(self, r: Request, now: int, ended, seen) -> Answer:
        hold, rejected = self._named(r, now, ended, seen)
        if hold is None:
            return rejected
        del self.holds[r.reservation]
        self.unpin(r.account, hold)
        return self._answer(r, "approved", "", 0, now, reserved=hold.amount, expires_at=hold.expires_at)


def merged(before: tuple[Draw, ...], more: list[Draw]) -> tuple[Draw, ...]:
    """A hold's draws with more pinned: those of one lot added up, in the order first pinned."""
    out: dict[str, list] = {lot: [qty, unit] for lot, qty, unit in before}
    for lot, qty, unit in more:
        out.setdefault(lot, [0, unit])[0] += qty
    return tuple((lot, qty, unit) for lot, (qty, unit) in out.items())
