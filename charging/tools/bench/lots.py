"""lots: what credit lots cost (docs/plans-and-lots.md). The same load is settled for plain
accounts (a main balance only) and for accounts that hold five lots each: a bundle of 1,000
sms units that expires in 30 days, money for voice only, money for data only, a promotion
for any service that expires in 7 days, and the main balance. sms charges then take bundle
units, voice and data charges their own money, so nearly every charge draws from a lot.

Both are drained as the baseline mode drains today's library (one driver, the worker's pump
calls), in namespaces of their own, taking turns a part of the load at a time so a machine
that slows down weighs on both alike: Redis CPU per charge of both and their ratio. Memory:
INFO used_memory before and after setting the accounts' balances and after granting their
lots, and the wallets hashes' MEMORY USAGE (what the lots themselves take)."""

from __future__ import annotations

import math

from charging import codec
from charging.app.audit import audit
from charging.keys import all_partitions
from charging.settings import Settings
from charging.tools.bench import baseline
from charging.tools.bench import load as loads
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult

DAY_MS = 86_400_000
# (lot id, kind, quantity, service, expires in ms): what every account of the lots side holds
# beside its main balance. Large enough that no account of the load spends one to the end.
LOTS = (("sms1000", "units", 1_000, "sms", 30 * DAY_MS),
        ("voice", "money", 20_000, "voice", None),
        ("data", "money", 20_000, "data", None),
        ("promo", "money", 5_000, None, 7 * DAY_MS))


def run(ctx: Context, profile: Profile) -> ModeResult:
    charges = profile.drain_charges // 3
    sides = {"plain": ctx.settings_for("lots0"), "lots": ctx.settings_for("lots1")}
    load = loads.mixed(profile.accounts, charges, seed=9, prefix=f"{sides['lots'].namespace}-")
    baseline.prepare(ctx, sides["plain"], load)
    memory, granted = _prepare_lots(ctx, sides["lots"], load)
    work, seconds = dict.fromkeys(sides, baseline.NOTHING), dict.fromkeys(sides, 0.0)
    part = math.ceil(len(load) / baseline.ROUNDS)
    with ctx.task("lots", 2 * len(load)) as advance:
        for start in range(0, len(load), part):
            for name, settings in sides.items():
                done, took = baseline.drain_part(ctx, settings, load.requests[start:start + part],
                                                 baseline.pump_all, advance)
                work[name], seconds[name] = work[name] + done, seconds[name] + took
    plain = audit(ctx.client, sides["plain"], load.balances, load.expected)
    check = audit(ctx.client, sides["lots"], load.balances, load.expected, granted)
    spent, plain_spent = (baseline.NOTHING.per_charge(work[name], len(load)) for name in ("lots", "plain"))
    ratio = spent["redis_cpu_us"] / plain_spent["redis_cpu_us"] if plain_spent.get("redis_cpu_us") else None
    return ModeResult(
        "lots", check.outcomes, seconds["lots"], check.as_dict(), check.ok and plain.ok,
        extra={"per_charge": spent | {f"plain_{name}": value for name, value in plain_spent.items()},
               "lots_cpu_ratio": None if ratio is None else round(ratio, 2),
               "accounts": len(load.balances), "lots_per_account": len(LOTS) + 1, "bytes": memory,
               "plain_check": plain.as_dict()},
        notes=[f"one driver, one load, plain accounts and accounts with {len(LOTS)} lots and a main balance "
               f"taking turns ({baseline.ROUNDS} rounds); lots_cpu_ratio = redis_cpu_us / plain_redis_cpu_us; "
               "bytes from INFO used_memory around the grants, the wallet from MEMORY USAGE"],
    )


def _prepare_lots(ctx: Context, settings: Settings, load: loads.Load) -> tuple[dict, dict[tuple[str, str], int]]:
    """Balances, then every account's lots: what they cost in memory, and what was granted."""
    accounts = list(load.balances)
    grants = [(account, lot, kind, quantity, service, None, expires_in)
              for account in accounts for lot, kind, quantity, service, expires_in in LOTS]
    before = _used(ctx)
    baseline.prepare(ctx, settings, load)
    balances = _used(ctx)
    _grant(ctx, settings, grants)
    with_lots = _used(ctx)
    partitions = all_partitions(settings.namespace, settings.partitions)
    wallets = sum(ctx.client.memory_usage(keys.wallets, samples=0) or 0 for keys in partitions)
    memory = {"per_lot": round((with_lots - balances) / len(grants)),
              "wallet_per_account": round(wallets / len(accounts)),
              "per_account_plain": round((balances - before) / len(accounts)),
              "per_account_with_lots": round((with_lots - before) / len(accounts)),
              "used_memory": {"before": before, "balances": balances, "granted": with_lots}}
    return memory, {(account, lot): quantity for account, lot, _, quantity, *_ in grants}


def _grant(ctx: Context, settings: Settings, grants: list[tuple]) -> None:
    """One grant call each (40,000 take a few seconds in the quick profile); every one must
    be granted."""
    with ctx.task("lots: grants", len(grants)) as advance:
        for grant in grants:
            granted = codec.grant(ctx.client, settings, *grant)
            if granted.status != "granted":
                raise RuntimeError(f"a bench grant was not granted: {granted}")
            advance(1)


def _used(ctx: Context) -> int:
    return int(ctx.client.info("memory")["used_memory"])
