"""naive: the assignment's original handler, kept as the "before" picture. A new
connection per request, GET the balance, and if it covers the price, DECRBY it: two
round trips with nothing holding the balance in between, so concurrent charges on one
account can all pass the GET and drive it below zero.

It runs on plain string keys of its own (naive:<namespace>:<account>), never on the
engine's balances, and its violations are counted, not hidden: a charge is over-approved
when its DECRBY answered a negative balance."""

from __future__ import annotations

from collections import defaultdict

from charging.connection import connect
from charging.settings import Settings
from charging.tools.bench import load as loads
from charging.tools.bench.clients import run_clients
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult


def key_prefix(settings: Settings) -> str:
    return f"naive:{settings.namespace}:"


class NaiveClient:
    def __init__(self, settings_dump: dict):
        self.settings = Settings(**settings_dump)
        self.prefix = key_prefix(self.settings)

    def __call__(self, job: tuple[str, int]) -> tuple[str, int, bool, int]:
        """(account, amount, approved, balance after) as the handler answered it."""
        account, amount = job
        client = connect(self.settings, load=False)  # a new connection per request, as the original did
        try:
            balance = int(client.get(self.prefix + account))
            if balance < amount:
                return account, amount, False, balance
            return account, amount, True, client.decrby(self.prefix + account, amount)
        finally:
            client.close()


def run(ctx: Context, profile: Profile) -> ModeResult:
    settings = ctx.settings_for("naive")
    load = loads.contended(profile.hot_accounts, profile.client_charges, seed=5, prefix=f"{settings.namespace}-")
    prefix = key_prefix(settings)
    ctx.client.mset({prefix + account: balance for account, balance in load.balances.items()})
    with ctx.task("naive: GET+DECRBY", len(load)) as advance:
        run = run_clients(NaiveClient, (settings.model_dump(),), loads.priced(load, settings), profile.clients,
                          profile.client_processes, None, advance)
    accounts = list(load.balances)
    end = dict(zip(accounts, (int(v) for v in ctx.client.mget([prefix + a for a in accounts]))))
    check = check_naive(load.balances, end, run.replies, expected=len(load))
    return ModeResult(
        "naive", len(run.replies), run.seconds, check, check["consistent"] and not run.errors,
        latencies_ms=run.latencies_ms, done_at_s=run.done_at_s,
        extra={"clients": profile.clients, "hot_accounts": profile.hot_accounts, "key_prefix": prefix,
               "errors": len(run.errors), "first_errors": run.errors[:3]},
        notes=[f"{profile.clients} clients, closed loop, on {profile.hot_accounts} contended accounts; "
               "no dedupe and no outcome stream (the original had neither)"],
    )


def check_naive(start: dict[str, int], end: dict[str, int], replies: list, expected: int) -> dict:
    """The money as the keys hold it, against what the handler told its callers."""
    approved_sum: dict[str, int] = defaultdict(int)
    approved = over_approved = 0
    for account, amount, ok, after in replies:
        if ok:
            approved += 1
            approved_sum[account] += amount
            over_approved += after < 0
    negative = {a: b for a, b in end.items() if b < 0}
    mismatches = [a for a in start if start[a] - end[a] != approved_sum.get(a, 0)]
    return {
        "outcomes": len(replies), "missing": expected - len(replies), "approved": approved,
        "start_total": sum(start.values()), "approved_total": sum(approved_sum.values()),
        "rejected": {"insufficient_funds": len(replies) - approved},
        "over_approved": over_approved, "negative_balances": len(negative), "overdraft": -sum(negative.values()),
        "money_mismatches": len(mismatches),
        # Every negative account got there by an over-approved charge, and only that way.
        "consistent": not mismatches and (over_approved > 0) == bool(negative) and over_approved >= len(negative),
    }
