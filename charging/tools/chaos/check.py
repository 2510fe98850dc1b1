"""The verdict of a chaos run: the independent audit (charging.audit reads Redis alone, not
through the worker's code) held against the producers' own records of what Redis confirmed.

With appendfsync always a confirmed request must never be lost. With everysec, losing the
last writes before a Redis kill is the documented price of the policy: the run measures the
loss and reports it instead of failing on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from charging.app.audit import Audit, DeadLetterAudit, audit, audit_deadletters
from charging.settings import Settings
from charging.tools.chaos import hostile
from charging.tools.chaos.faults import REDIS_KILL, WORKER_KILL, WORKER_STALL
from charging.tools.chaos.load import Record
from charging.tools.chaos.profile import Profile

REASONS = {kind.name: kind.reason for kind in hostile.KINDS}


@dataclass
class Verdict:
    numbers: dict = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def require(self, holds: bool, violation: str) -> None:
        if not holds:
            self.violations.append(violation)


def judge(client: redis.Redis, settings: Settings, profile: Profile, fsync: str, start_balances: dict[str, int],
          granted: dict[tuple[str, str], int], records: list[Record], faults: list[dict], events: dict[str, int],
          worker_exits: list[dict], stop_codes: list[int]) -> Verdict:
    """granted: (account, lot) -> quantity, the credit lots the accounts started with;
    faults: what the injector did (faults.Injector.done); events: counts from the workers' logs."""
    confirmed = {rid for r in records for rid in r.confirmed + r.session_steps}
    bad = {key: REASONS[kind] for r in records for key, kind in r.bad.items()}
    money = audit(client, settings, start_balances, confirmed, granted)
    dead = audit_deadletters(client, settings, bad, good=confirmed)
    v = Verdict(numbers={
        "confirmed": len(confirmed), "bad_entries": len(bad),
        "lost": len(money.missing) + len(dead.missing), "lost_charges": len(money.missing),
        "lost_bad_entries": len(dead.missing), "double_charged": len(money.repeated),
        "entries_settled_twice": len(money.resettled), "money_mismatches": len(money.money),
        "negative": len(money.negative), "pending": money.pending, "dead_lettered": dead.found,
        "lot_mismatches": len(money.lot_mismatch), "breakage_mismatches": len(money.breakage_mismatch),
        "audit": money.as_dict(), "deadletters": dead.as_dict(),
        "sample_lost": sorted(money.missing)[:10] + sorted(dead.missing)[:10],
    })
    if fsync == "always":
        _nothing_lost(v, money, dead, records)
    _money(v, money)
    _dead_letters(v, dead, records)
    _faults(v, profile, settings, faults, events)
    # Workers must ride out every fault by themselves; a clean stop is SIGTERM -> exit 0.
    v.require(not worker_exits, f"workers exited on their own: {worker_exits[:5]}")
    v.require(all(c == 0 for c in stop_codes), f"workers did not stop cleanly on SIGTERM: exit codes {stop_codes}")
    return v


def _nothing_lost(v: Verdict, money: Audit, dead: DeadLetterAudit, records: list[Record]) -> None:
    v.require(not money.missing and not dead.missing,
              f"lost {len(money.missing)} confirmed charges and {len(dead.missing)} bad entries with appendfsync "
              f"always: {sorted(money.missing)[:5] + sorted(dead.missing)[:5]}")
    # Every confirmed resubmission is an entry of its own and gets an outcome marked duplicate.
    resent = sum(r.replays + len(r.conflicts) for r in records)
    v.require(money.duplicates >= resent, f"{resent} confirmed resubmissions but only {money.duplicates} "
                                          f"duplicate outcomes")
    # Whichever content came first, a request id sent with two contents meets a conflict.
    unanswered = {rid for r in records for rid in r.conflicts} - money.conflicts
    v.require(not unanswered, f"{len(unanswered)} request ids resubmitted with other content never answered "
                              f"idempotency_conflict: {sorted(unanswered)[:5]}")


def _money(v: Verdict, money: Audit) -> None:
    v.require(not money.repeated, f"{len(money.repeated)} request ids charged twice: {money.repeated[:5]}")
    v.require(not money.resettled, f"{len(money.resettled)} stream entries settled twice: {money.resettled[:5]}")
    v.require(not money.replay_mismatches, f"{len(money.replay_mismatches)} replays not answered with the stored "
                                           f"outcome: {money.replay_mismatches[:5]}")
    v.require(not money.money, f"sum(approved) != start - end for {len(money.money)} accounts: "
                               f"{dict(list(money.money.items())[:5])}")
    v.require(not money.negative, f"negative balances: {dict(list(money.negative.items())[:5])}")
    v.require(not money.lot_mismatch, f"granted != spent + breakage + left for {len(money.lot_mismatch)} lots "
                                      f"(granted, spent, breakage, left): {dict(list(money.lot_mismatch.items())[:5])}")
    v.require(not money.breakage_mismatch, f"breakage events != the wallet's breakage for {len(money.breakage_mismatch)} "
                                           f"accounts (events, wallet): {dict(list(money.breakage_mismatch.items())[:5])}")
    # The run must have done what it claims: lots spent, and lots expiring while charges flowed.
    v.require(money.lot_draws > 0, "no charge drew from a credit lot")
    v.require(money.breakage_events > 0, "no lot expired with something left: breakage was never recorded")
    v.require(money.pending == 0, f"{money.pending} entries still pending")


def _dead_letters(v: Verdict, dead: DeadLetterAudit, records: list[Record]) -> None:
    v.require(not dead.wrong_reason, f"{len(dead.wrong_reason)} bad entries dead-lettered with the wrong reason: "
                                     f"{dict(list(dead.wrong_reason.items())[:5])}")
    v.require(not dead.repeated, f"{len(dead.repeated)} bad entries dead-lettered more than once")
    v.require(not dead.good, f"{len(dead.good)} good requests dead-lettered: {dead.good[:5]}")
    written = {kind for r in records for kind in r.bad.values()}
    v.require(written == set(REASONS), f"kinds of bad entry never written: {sorted(set(REASONS) - written)}")


def _faults(v: Verdict, profile: Profile, settings: Settings, faults: list[dict], events: dict[str, int]) -> None:
    """The run must have done what it claims to test."""
    for kind, wanted in ((WORKER_KILL, profile.worker_kills), (WORKER_STALL, profile.worker_stalls),
                         (REDIS_KILL, profile.redis_kills)):
        done = sum(1 for f in faults if f["kind"] == kind)
        v.require(done >= wanted, f"only {done} of {wanted} planned {kind} injected")
    stalls = [f for f in faults if f["kind"] == WORKER_STALL]
    v.require(all(f["lasted_s"] > settings.reclaim_idle_ms / 1000 for f in stalls),
              f"a stall was not longer than the reclaim idle time: {[f['lasted_s'] for f in stalls]}")
    v.require(any(f["held"] for f in stalls), "no stall caught a worker holding entries")
    # A woken worker's pump reads only its own pending entries, so once another consumer has
    # reclaimed what it held, its late call finds nothing of them: the reclaim is the stall path.
    v.require(events["entries_reclaimed"] > 0 or not stalls,
              "no stalled worker's entries were reclaimed by another: the stall path was not exercised")
