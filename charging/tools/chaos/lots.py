"""The plans and credit lots a chaos run's accounts start with (docs/plans-and-lots.md).

Before the load, every third account is granted a bundle of sms units, money for voice
only and a promotion for any service. Every promotion and half of the bundles expire while
the load runs (a few seconds in at the earliest), so breakage is recorded while charges
flow, workers die and Redis restarts; the other bundles outlive the run. Every fifth account
is on a plan of its own prices. Made from the seed, like the load: the checker holds every
lot to granted == spent + breakage + left."""

from __future__ import annotations

import random
from dataclasses import dataclass

import redis

from charging import codec
from charging.app.plans import setting_plan
from charging.plan import run
from charging.settings import Settings
from charging.tools.chaos.profile import Profile

PLANS = {"gold": {"sms": 1, "voice": 4, "data": 8}, "silver": {"sms": 2, "voice": 6, "data": 12}}
LOT_EVERY, PLAN_EVERY = 3, 5  # every third account holds lots, every fifth is on a plan
BUNDLE_UNITS, VOICE_MONEY, PROMO_MONEY = 100, 2_000, 3_000
OUTLIVES_MS = 86_400_000  # a bundle that does not expire during the run
# Lots expire from this many seconds after the grant to this share of the load's length.
FIRST_EXPIRY_S, LAST_EXPIRY_SHARE = 4.0, 0.8


@dataclass(frozen=True)
class Grant:
    account: str
    lot: str
    kind: str
    quantity: int
    service: str | None
    expires_in_ms: int | None


@dataclass
class Started:
    """What the accounts started with: every lot granted, and which account is on which plan."""

    grants: list[Grant]
    plans: dict[str, str]  # account -> plan

    @property
    def granted(self) -> dict[tuple[str, str], int]:
        """(account, lot) -> quantity, as the checker takes it."""
        return {(g.account, g.lot): g.quantity for g in self.grants}

    def summary(self, profile: Profile) -> dict:
        expiring = [g for g in self.grants if g.expires_in_ms and g.expires_in_ms < profile.duration_s * 1000]
        return {"accounts_with_lots": len({g.account for g in self.grants}), "lots": len(self.grants),
                "lots_expiring_during_load": len(expiring), "accounts_on_plans": len(self.plans)}


def plan_lots(profile: Profile, seed: int, accounts: list[str]) -> Started:
    rng = random.Random(f"chaos-lots-{seed}")
    last_s = max(FIRST_EXPIRY_S, LAST_EXPIRY_SHARE * profile.duration_s)

    def during_load() -> int:
        return int(rng.uniform(FIRST_EXPIRY_S, last_s) * 1000)

    grants = []
    for account in accounts[::LOT_EVERY]:
        bundle_expiry = during_load() if rng.random() < 0.5 else OUTLIVES_MS
        grants += [Grant(account, "bundle", "units", BUNDLE_UNITS, "sms", bundle_expiry),
                   Grant(account, "voice", "money", VOICE_MONEY, "voice", None),
                   Grant(account, "promo", "money", PROMO_MONEY, None, during_load())]
    names = list(PLANS)
    plans = {account: names[i % len(names)] for i, account in enumerate(accounts[::PLAN_EVERY])}
    return Started(grants, plans)


def give(client: redis.Redis, settings: Settings, started: Started) -> None:
    """Set the plans on every partition, put the accounts on them, grant the lots."""
    for name, prices in PLANS.items():
        run(client, setting_plan(settings, name, prices))
    for account, name in started.plans.items():
        codec.assign_plan(client, settings, account, name)
    for g in started.grants:
        granted = codec.grant(client, settings, g.account, g.lot, g.kind, g.quantity, g.service,
                              expires_in_ms=g.expires_in_ms)
        if granted.status != "granted":
            raise RuntimeError(f"a chaos grant was not granted: {granted}")
