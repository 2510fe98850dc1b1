"""The bench's charges: the demo's sms/voice/data mix over many accounts, with some
accounts too poor for more than a couple of charges (insufficient funds) and some
request ids sent twice (duplicates); or a contended load on a few hot accounts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from charging.app.accounts import numbered
from charging.schema import parse_request
from charging.settings import Settings
from charging.tariff import price
from charging.tools.demo import mixed_load

RICH = 10**9  # never runs out during a bench
POOR = 400  # a couple of charges, then insufficient_funds
POOR_SHARE = 0.05
REPLAY_SHARE = 0.01
MEAN_PRICE = 190  # of the demo mix with the default tariff (sms ~3, voice ~300, data ~255)


@dataclass
class Load:
    requests: list[dict]  # in submission order, replays included
    balances: dict[str, int]  # every account's balance before the load
    expected: list[str]  # request ids that must each get exactly one first outcome

    def __len__(self) -> int:
        return len(self.requests)


def mixed(accounts: int, charges: int, seed: int, prefix: str, replays: float = REPLAY_SHARE) -> Load:
    """`replays`: the share of request ids sent a second time."""
    rng = random.Random(seed)
    names = numbered(accounts)
    balances = {a: POOR if rng.random() < POOR_SHARE else RICH for a in names}
    first = mixed_load(names, charges, rng, prefix)
    # Each replay is sent some time after its original, as a producer retry would be.
    order = [(i, r) for i, r in enumerate(first)]
    order += [(rng.uniform(i, charges), first[i]) for i in rng.sample(range(charges), k=int(charges * replays))]
    order.sort(key=lambda pair: pair[0])
    return Load([dict(r) for _, r in order], balances, [r["request_id"] for r in first])


def contended(accounts: int, charges: int, seed: int, prefix: str) -> Load:
    """Few accounts, each with money for about half of the charges aimed at it: concurrent
    charges meet on the same balance, and the last of the money is fought over."""
    rng = random.Random(seed)
    names = numbered(accounts)
    balance = max(1, charges // accounts * MEAN_PRICE // 2)
    requests = mixed_load(names, charges, rng, prefix)
    return Load(requests, dict.fromkeys(names, balance), [r["request_id"] for r in requests])


def priced(load: Load, settings: Settings) -> list[tuple[str, int]]:
    """(account, amount) per charge, rated by the engine's own schema and tariff."""
    out = []
    for fields in load.requests:
        request = parse_request(fields, settings)
        out.append((request.account, price(request, settings)))
    return out
